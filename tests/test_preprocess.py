"""Image preprocessing: SPRC's TargetPad(1.25), bicubic shorter-side resize, center crop,
CLIP normalisation, and odd input modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.config import CLIP_MEAN, CLIP_STD
from retrieval.preprocess import ImagePreprocessor

PRE = ImagePreprocessor(size=32)


def _ref_target_pad(image: Image.Image, ratio: float = 1.25) -> Image.Image:
    """SPRC's TargetPad written from its definition: when max/min side >= ratio, pad (black)
    symmetrically so the image gets to aspect ``ratio``; otherwise leave it."""
    w, h = image.size
    if max(w, h) / min(w, h) < ratio:
        return image
    scaled = max(w, h) / ratio
    hp, vp = max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)
    arr = np.asarray(image)
    pad = ((vp, vp), (hp, hp)) + (((0, 0),) if arr.ndim == 3 else ())
    return Image.fromarray(np.pad(arr, pad, constant_values=0), mode=image.mode)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(100, 90), (90, 100), (124, 100), (64, 64)])
def test_target_pad_leaves_near_square_images(size: tuple[int, int]) -> None:
    img = _noise(*size)
    out = PRE.target_pad(img)
    assert out.size == img.size
    assert np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((200, 100), (200, 160)),
        ((100, 300), (240, 300)),
        ((400, 50), (400, 320)),
        ((126, 100), (126, 100)),
    ],
)
def test_target_pad_wide_and_tall_images(size: tuple[int, int], expected: tuple[int, int]) -> None:
    img = _noise(*size, seed=1)
    out = PRE.target_pad(img)
    ref = _ref_target_pad(img)
    assert out.size == ref.size == expected
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    w, h = out.size
    if out.size != img.size:
        assert max(w, h) / min(w, h) == pytest.approx(1.25, abs=0.02)  # padded to the ratio


def test_output_shape_dtype_and_normalisation() -> None:
    colour = (255, 0, 128)
    img = Image.new("RGB", (50, 30), colour)
    x = PRE(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # padding is black, the centre keeps the colour, normalised with CLIP mean/std
    centre = x[:, 16, 16]
    expect = [(c / 255.0 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(centre, torch.tensor(expect), atol=1e-4, rtol=0)
    black = [(0.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(x[:, 0, 16], torch.tensor(black), atol=1e-4, rtol=0)  # top pad row


def test_resize_and_centre_crop_match_reference() -> None:
    img = _noise(40, 60, seed=2)  # ratio 1.5: padded to 48x60, then resized and cropped
    padded = _ref_target_pad(img)
    w, h = padded.size
    nw, nh = 32, int(32 * h / w)
    resized = padded.resize((nw, nh), Image.Resampling.BICUBIC)
    top = int(round((nh - 32) / 2.0))
    crop = np.asarray(resized.crop((0, top, 32, top + 32)), dtype=np.float32) / 255.0
    ref = (crop - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    np.testing.assert_allclose(PRE(img).numpy(), ref.transpose(2, 0, 1), atol=1e-5)


def test_batch_shape() -> None:
    batch = PRE.batch([_noise(40, 40), _noise(80, 20), _noise(20, 33)])
    assert batch.shape == (3, 3, 32, 32)
    assert torch.isfinite(batch).all()


def test_cmyk_rgba_16bit_and_grey_inputs() -> None:
    white = PRE(Image.new("RGB", (40, 40), (255, 255, 255)))
    # fully transparent RGBA is composited on white
    torch.testing.assert_close(PRE(Image.new("RGBA", (40, 40), (10, 200, 30, 0))), white)
    # 16-bit greyscale at full scale is white; half scale is mid grey
    full = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    assert full.mode.startswith("I")
    torch.testing.assert_close(PRE(full), white)
    half = PRE(Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)))
    grey = PRE(Image.new("RGB", (40, 40), (127, 127, 127)))
    torch.testing.assert_close(half, grey, atol=0.02, rtol=0)
    # CMYK converts to RGB (pure cyan -> no red)
    cmyk = Image.new("CMYK", (40, 40), (255, 0, 0, 0))
    x = PRE(cmyk)
    assert x.shape == (3, 32, 32)
    red = (0.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert x[0, 16, 16].item() == pytest.approx(red, abs=1e-4)
    assert x[1, 16, 16].item() > 1.5 and x[2, 16, 16].item() > 1.5
    # grey "L" and palette images
    torch.testing.assert_close(PRE(Image.new("L", (40, 40), 255)), white)
    torch.testing.assert_close(PRE(Image.new("RGB", (40, 40), (255, 255, 255)).convert("P")), white)


def test_to_dict_describes_the_pipeline() -> None:
    d = ImagePreprocessor(size=224).to_dict()
    assert d["size"] == 224 and d["target_pad_ratio"] == 1.25
    assert d["mean"] == list(CLIP_MEAN) and d["std"] == list(CLIP_STD)
    assert ImagePreprocessor(size=224, target_pad_ratio=1.5).to_dict() != d
