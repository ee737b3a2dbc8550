"""One precision vocabulary for the Encoder, training and indexing (as open_clip's precision
strings: one set of names, one function that turns a name into dtypes and autocast).

Names (the older spellings are aliases, so existing commands keep working):

=======  =================  ==========================================================
name     aliases            meaning
=======  =================  ==========================================================
auto                        bf16 on CUDA, fp32 on CPU
fp32     float32            float32 weights and compute
bf16     bfloat16           bfloat16 compute (see below per use)
fp16     float16            float16 compute (inference and storage only)
=======  =================  ==========================================================

Per use (``resolve_precision(name, device, training=...)``):

* inference (``Encoder``; ``cir eval --dtype``, ``cir index build --dtype``, ``cir serve
  --dtype``): the ViT's weights in the dtype; the Q-Former, its embeddings, query/prompt tokens,
  projections and temperature stay float32 (``SPRCModel._keep_in_fp32_modules``, as transformers
  keeps BLIP-2's Q-Former); no autocast: every module computes in its weights' dtype.
* training (``cir train --precision``, ``cir train-reranker --precision``): float32 master
  weights under bf16 autocast (CPU too: pays off with AVX512-BF16/AMX); fp16 is refused (it
  would need a gradient scaler).
* storage (``storage_dtype``; ``--weights-dtype``, ``cir convert --dtype``): the tensors'
  dtype on disk; ``auto`` is refused (a file's dtype must not depend on the machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # canonical names
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # older spellings
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    """What a precision name means on one device, for one use."""

    name: str  # canonical, "auto" resolved: fp32 | bf16 | fp16
    dtype: torch.dtype  # compute dtype (inference: the ViT's weights; training: autocast's)
    autocast: bool  # wrap the forward in torch.autocast(device, dtype)

    def autocast_context(self, device_type: str) -> torch.autocast:
        """``torch.autocast`` for this precision (a disabled one when ``autocast`` is False)."""
        return torch.autocast(device_type, dtype=self.dtype, enabled=self.autocast)


def canonical_precision(name: str | torch.dtype) -> str:
    """An alias or canonical name (or a torch dtype) -> the canonical name; ValueError."""
    if isinstance(name, torch.dtype):
        if name not in _NAMES:
            raise ValueError(f"unsupported dtype {name}; use one of {', '.join(PRECISIONS)}")
        return _NAMES[name]
    key = ALIASES.get(name, name)
    if key not in PRECISIONS:
        known = ", ".join(f"{p}" for p in PRECISIONS) + " (aliases: " + ", ".join(ALIASES) + ")"
        raise ValueError(f"precision must be one of {known}, got {name!r}")
    return key


def resolve_precision(
    name: str | torch.dtype, device: torch.device | str, *, training: bool = False
) -> Precision:
    """The one function from a precision name to (dtype, autocast) for ``device``."""
    key = canonical_precision(name)
    dev = torch.device(device)
    if key == "auto":
        key = "bf16" if dev.type == "cuda" else "fp32"
    if training:
        if key == "fp16":
            raise ValueError("precision fp16 is not supported for training (use bf16 or fp32)")
        return Precision(key, TORCH_DTYPES[key], autocast=key != "fp32")
    return Precision(key, TORCH_DTYPES[key], autocast=False)


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    """The dtype tensors are stored in (``--weights-dtype``, ``cir convert --dtype``)."""
    key = canonical_precision(name)
    if key == "auto":
        raise ValueError("a stored dtype must be explicit: fp32, bf16 or fp16 (not auto)")
    return TORCH_DTYPES[key]


__all__ = [
    "ALIASES",
    "PRECISIONS",
    "TORCH_DTYPES",
    "Precision",
    "canonical_precision",
    "resolve_precision",
    "storage_dtype",
]
