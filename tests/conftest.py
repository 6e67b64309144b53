"""Test set-up: Triton's interpreter on CPU-only machines, NaN-poisoned kernel outputs."""

import os

import torch

# Must happen before aepo.kernels (and its @triton.jit functions) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from aepo.kernels import _buffers


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every freshly allocated kernel output starts as NaN, so unwritten elements fail."""
    monkeypatch.setattr(_buffers, "POISON", True)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
