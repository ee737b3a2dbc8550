import os

import pytest

os.environ.setdefault("CIR_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def enc():  # noqa: ANN201 (an Encoder; imported lazily so collecting tests stays light)
    """The tiny model (random weights) on CPU in float32, once per test module."""
    from retrieval import Encoder

    return Encoder.from_pretrained("tiny", device="cpu", dtype="float32")
