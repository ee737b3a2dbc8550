"""Builds with the tiny model: the BuildConfig every indexer test starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from indexer.config import BuildConfig


def build_config(source: Path, index: Path, **kw: Any) -> BuildConfig:
    """An in-process build of ``source`` into ``edge:index`` (gallery "g") with the tiny model's
    random weights (refused by default; these tests use them), no progress bar, no decode
    workers; ``kw`` overrides any field."""
    base: dict[str, Any] = dict(
        index=f"edge:{index}",
        name="g",
        model="tiny",
        allow_untrained=True,
        batch_size=8,
        workers=0,
        progress=False,
        verify_sample=8,
    )
    base.update(kw)
    return BuildConfig(source=source, **base)
