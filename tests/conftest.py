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
