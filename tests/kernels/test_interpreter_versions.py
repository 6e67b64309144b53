"""Triton / numpy pairs whose interpreter is broken are refused at launch, naming both."""

from __future__ import annotations

import numpy
import pytest
import torch
import triton

from aepo.kernels import _launch, logprobs_and_entropy


# The measured pairs ran tests/kernels under torch 2.13.0+cpu: Triton 3.6.0 with numpy 2.4.6
# failed every interpreted kernel ("only 0-dimensional arrays can be converted to Python
# scalars"), with numpy 2.3.5 and Triton 3.7.0 / 3.9.0 with numpy 2.4.6 passed.
@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "broken"),
    [
        ("3.6.0", "2.4.6", True),  # measured
        ("3.3.1", "2.4.0", True),
        ("3.6.0", "2.5.0rc1", True),
        ("3.6.0", "2.3.5", False),  # measured
        ("3.7.0", "2.4.6", False),  # measured
        ("3.9.0", "2.4.6", False),  # measured
        ("3.7.0+git1a2b3c", "2.4.0", False),
        ("3.10.0", "2.4.0", False),
        ("3.3.1", "1.26.4", False),
    ],
)
def test_interpreter_problem(triton_version, numpy_version, broken):
    problem = _launch.interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert f"Triton {triton_version}" in problem and f"numpy {numpy_version}" in problem
        assert "numpy<2.4" in problem and "triton>=3.7" in problem


@pytest.fixture
def fresh_check():
    _launch._check_interpreter.cache_clear()
    yield
    _launch._check_interpreter.cache_clear()


@pytest.mark.skipif(not _launch.INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_launch_refuses_a_broken_pair(monkeypatch, fresh_check):
    logits, labels = torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0's interpreter .* numpy 2\.4\.6"):
        logprobs_and_entropy(logits, labels, backend="triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    _launch._check_interpreter()  # a working pair passes
