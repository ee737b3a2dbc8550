"""SPRC image preprocessing: TargetPad(1.25) -> bicubic resize -> center crop -> CLIP norm.

Implemented with Pillow + numpy (no torchvision) so that it is cheap to pickle into DataLoader
workers. ``ImagePreprocessor`` is a small callable: PIL image -> float tensor [3, S, S].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from retrieval.config import CLIP_MEAN, CLIP_STD, SPRCConfig
from retrieval.imageio import to_rgb


@dataclass(frozen=True)
class ImagePreprocessor:
    size: int  # output side in pixels (the model's image_size)
    target_pad_ratio: float = 1.25  # pad to square only when max/min side >= this (SPRC TargetPad)
    mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean (retrieval.config's home)
    std: tuple[float, float, float] = CLIP_STD  # per-channel std

    def target_pad(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.target_pad_ratio:
            return image
        scaled = max(w, h) / self.target_pad_ratio
        hp = max(int((scaled - w) / 2), 0)
        vp = max(int((scaled - h) / 2), 0)
        if hp == 0 and vp == 0:
            return image
        out = Image.new(image.mode, (w + 2 * hp, h + 2 * vp), 0)
        out.paste(image, (hp, vp))
        return out

    def resize_crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        s = self.size
        if w <= h:
            nw, nh = s, max(int(s * h / w), s)
        else:
            nw, nh = max(int(s * w / h), s), s
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left = int(round((nw - s) / 2.0))
        top = int(round((nh - s) / 2.0))
        return image.crop((left, top, left + s, top + s))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.resize_crop(self.target_pad(to_rgb(image)))
        arr: np.ndarray = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # [S, S, 3]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1)))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, 3, S, S] float32."""
        return torch.stack([self(im) for im in images])

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> uint8 [3, S, S] after TargetPad + resize + crop (no normalisation: the
        training banks keep pixels as uint8 and normalise per batch, see BatchNormaliser)."""
        im = self.resize_crop(self.target_pad(image))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())

    @classmethod
    def from_config(cls, config: SPRCConfig) -> ImagePreprocessor:
        return cls(
            size=config.image_size,
            target_pad_ratio=config.target_pad_ratio,
            mean=config.image_mean,
            std=config.image_std,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "size": self.size,
            "target_pad_ratio": self.target_pad_ratio,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": "bicubic-shorter-side",
            "crop": "center",
        }


class BatchNormaliser:
    """uint8 pixels [N, 3, S, S] -> the encoder's normalised float input (per batch, not per
    image): what ``ImagePreprocessor.__call__`` does after its crop, on many images at once."""

    def __init__(self, pre: ImagePreprocessor) -> None:
        self.mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self.mean) / self.std
