import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# segquant_torchao's Triton kernels run on Triton's CPU interpreter in tests; the variable must be set before
# triton is first imported (by any test module), or nested @triton.jit calls fail inside interpreted kernels
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
