"""The peers the benchmarks compare against, each used only where it is importable.

TRL 1.16 ships two kernels: ``trl.kernels.logprob_entropy`` (a Triton log-prob + entropy
kernel over logits, CUDA) and ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (the
hidden-state path on chunked cuBLAS GEMMs; torch tiles where Triton is absent). ``trl`` and
``trl.kernels`` import lazily and lightly; the chunked function's backward imports
``trl.trainer.utils``, which needs accelerate, datasets and pandas, so that peer counts as
importable only with those. On a GPU machine without them, unpack the wheels into a folder and
pass it to ``gpu_check.py --peers``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_NEEDS = {
    "trl-triton": ("trl.kernels.logprob_entropy",),
    "trl-chunked": ("trl.kernels.chunked_logprob", "trl.trainer.utils"),
    "liger": ("liger_kernel.chunked_loss", "liger_kernel.ops.cross_entropy"),
}


def trl_kernel(name: str) -> ModuleType:
    """``trl.kernels.<name>`` (TRL >= 1.16)."""
    return importlib.import_module(f"trl.kernels.{name}")


def missing(peer: str) -> str | None:
    """Why ``peer`` ("trl-triton", "trl-chunked", "liger") cannot run here; None if it can."""
    if peer not in _NEEDS:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(_NEEDS)}")
    for module in _NEEDS[peer]:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # a missing module, or one of its dependencies
            return f"{peer} is not importable here ({module}: {exc})"
    return None
