import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test
# imports a module that defines kernels. Without a GPU the interpreter is the only way to run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
