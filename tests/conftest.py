import os

# Triton kernels run in the interpreter on CPU tensors unless the environment says otherwise
# (TRITON_INTERPRET=0 on a GPU machine); it must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` random unit vectors, float32 ``(n, dim)``."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
