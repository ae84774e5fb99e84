"""Where the Triton tests run: the interpreter on CPU tensors, or a real GPU.

The interpreter is chosen by ``TRITON_INTERPRET=1`` before triton is imported (``conftest.py``
sets it unless the environment says otherwise); ``TRITON_INTERPRET=0`` on a CUDA machine runs
the same tests on the GPU. Anything else skips the module that imports this.
"""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("no GPU, and TRITON_INTERPRET is not 1", allow_module_level=True)
