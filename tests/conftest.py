"""Test set-up: Triton's interpreter for the CPU suite, NaN-poisoned kernel outputs.

Two passes on a CUDA machine (``make test`` runs both): the suite as on a CPU-only one, whose
``backend="triton"`` cases call the kernels on CPU tensors through the interpreter, and, with
``AEPO_CUDA_TESTS=1``, the ``cuda``-marked tests with compiled kernels (``pytest -m cuda``)."""

import os

import torch

# Must happen before aepo.kernels (and its @triton.jit functions) is imported.
if os.environ.get("AEPO_CUDA_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from aepo.kernels import _buffers


def pytest_configure(config):
    if os.environ.get("AEPO_REHEARSAL") == "1":  # before any backward (tests/nominal_device.py)
        from tests.nominal_device import install

        install()


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every freshly allocated kernel output starts as NaN, so unwritten elements fail."""
    monkeypatch.setattr(_buffers, "POISON", True)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs compiled kernels: the cuda pass, AEPO_CUDA_TESTS=1 pytest -m cuda")
    return torch.device("cuda")
