"""Which model a command uses: a checkpoint folder (trained weights) or a preset name (random
weights), made explicit in one place, without importing torch (CLI defaults read it).

The rule (``is_untrained_preset``): an existing folder is always a checkpoint, even one named
like a preset; a bare preset name that is not an existing folder means RANDOM weights
(``Encoder.from_pretrained`` builds the preset's architecture, seeded). Commands that build or
serve an index refuse random weights unless ``--allow-untrained`` (``check_trained``): their
results look like results but mean nothing.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.config import PRESETS

#: The committed demo model (trained): the default of ``cir index build`` and ``cir serve``.
DEFAULT_MODEL = "models/sprc-shapes"
_REPO_ROOT = Path(__file__).resolve().parents[1]  # this checkout (editable install)


class UntrainedModelError(ValueError):
    """A random-weight preset was asked for where a trained model is needed."""


def is_untrained_preset(name_or_path: str | Path) -> bool:
    """True when ``Encoder.from_pretrained(name_or_path)`` builds RANDOM weights: a preset name
    that is not an existing folder (a folder always wins, even one named like a preset)."""
    key = str(name_or_path)
    return key in PRESETS and not Path(key).is_dir()


def resolve_model(name_or_path: str | Path) -> str:
    """``name_or_path`` as given, except the default ``models/sprc-shapes``, which is also found
    in the repository of this checkout when the command runs from another directory."""
    key = str(name_or_path)
    if key == DEFAULT_MODEL and not Path(key).is_dir() and (_REPO_ROOT / key).is_dir():
        return str(_REPO_ROOT / key)
    return key


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
