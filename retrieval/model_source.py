"""Which model a command uses: a checkpoint folder (trained weights) or a preset name (random
weights), decided in one place (``parse_model_source``) for the Encoder, ``get_config`` and the
trainer, without importing torch (CLI defaults read it).

The rule, explicit schemes first (as open_clip's ``hf-hub:`` / ``local-dir:``):

* ``preset:NAME``     the preset NAME (random weights), even where a folder NAME exists;
* ``local-dir:PATH``  the checkpoint folder (or, for ``get_config``, config file) PATH;
* a bare string: an existing folder or file wins (also the default ``models/sprc-shapes`` of
  this checkout when run from elsewhere), else a preset name, else ``UnknownModelError``.

A preset means RANDOM weights (``Encoder.from_pretrained`` builds the preset's architecture,
seeded). Commands that build or serve an index refuse random weights unless
``--allow-untrained`` (``check_trained``): their results look like results but mean nothing.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.config import (  # the rule lives next to PRESETS (get_config uses it too)
    DEFAULT_MODEL,
    FOLDER_SCHEME,
    PRESET_SCHEME,
    ModelSource,
    UnknownModelError,
    parse_model_source,
    resolve_model,
)


class UntrainedModelError(ValueError):
    """A random-weight preset was asked for where a trained model is needed."""


def is_untrained_preset(name_or_path: str | Path) -> bool:
    """True when ``Encoder.from_pretrained(name_or_path)`` builds RANDOM weights: a preset name
    that is not an existing folder (a folder always wins, even one named like a preset), or an
    explicit ``preset:NAME``. Never raises (an unknown name is not a preset)."""
    try:
        return parse_model_source(name_or_path).is_preset
    except UnknownModelError:
        return False


def check_trained(name_or_path: str | Path, allow_untrained: bool, what: str) -> None:
    """Raise ``UntrainedModelError`` when ``name_or_path`` is a random-weight preset and
    ``allow_untrained`` is False; ``what`` names the command (e.g. "cir index build")."""
    if allow_untrained or not is_untrained_preset(name_or_path):
        return
    raise UntrainedModelError(
        f"{what}: {str(name_or_path)!r} is a preset name, i.e. RANDOM weights (no folder of that "
        f"name here): its results would mean nothing. Give a trained checkpoint folder (default "
        f"{DEFAULT_MODEL}), or pass --allow-untrained for a test or benchmark."
    )


__all__ = [
    "DEFAULT_MODEL",
    "FOLDER_SCHEME",
    "PRESET_SCHEME",
    "ModelSource",
    "UnknownModelError",
    "UntrainedModelError",
    "check_trained",
    "is_untrained_preset",
    "parse_model_source",
    "resolve_model",
]
