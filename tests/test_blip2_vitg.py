"""The real BLIP-2 size on CPU (random weights): ~1.2 B parameters and ~5 GB of RAM; building
it and encoding one image plus one composed query takes ~35 s on 2 idle cores."""

from __future__ import annotations

import numpy as np
from PIL import Image

from retrieval import Encoder
from retrieval.config import PRESETS


def test_blip2_vitg_encodes_an_image_and_a_composed_query_on_cpu() -> None:
    enc = Encoder.from_pretrained("blip2-vitg", device="cpu", dtype="float32")
    cfg = PRESETS["blip2-vitg"]
    assert (cfg.vision_hidden_size, cfg.vision_num_layers, cfg.qformer_hidden_size) == (
        1408,
        39,
        768,
    )
    n_params = sum(p.numel() for p in enc.model.parameters())
    assert 1.1e9 < n_params < 1.3e9
    image = Image.new("RGB", (320, 240), (200, 30, 30))
    targets = enc.encode_targets([image])
    assert targets.shape == (1, 32, 256)
    np.testing.assert_allclose(np.linalg.norm(targets, axis=-1), 1.0, atol=1e-4)
    query = enc.encode_queries([image], ["make it blue"])
    assert query.shape == (1, 256)
    assert abs(float(np.linalg.norm(query)) - 1.0) < 1e-4
