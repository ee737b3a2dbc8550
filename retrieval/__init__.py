"""SPRC composed image retrieval on BLIP-2's Q-Former."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval.encoder import Encoder

__all__ = ["Encoder"]


def __getattr__(name: str) -> Any:  # lazy: `import retrieval` must not import torch
    if name == "Encoder":
        from retrieval.encoder import Encoder

        return Encoder
    raise AttributeError(name)
