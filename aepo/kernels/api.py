"""The public entry point :func:`logprobs_and_entropy` and its backend choice."""

from __future__ import annotations

import torch

from aepo.kernels import _launch
from aepo.kernels._checks import check_logits_labels, check_temperature
from aepo.kernels.logprob_entropy import logprobs_entropy_fwd
from aepo.kernels.torch_backend import torch_logprobs_and_entropy

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, logits: torch.Tensor) -> str:
    """Map ``backend`` to "triton" or "torch" for these logits, or raise naming the problem.

    "auto" is triton on CUDA (and on CPU under TRITON_INTERPRET=1), torch otherwise and for
    float64 (the kernels accumulate in fp32). Inside the compile gate's
    ``record_launches(run=False)`` CPU tensors count as a Triton device: nothing runs there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cpu = logits.device.type == "cpu"
    triton_device = logits.is_cuda or (on_cpu and (_launch.INTERPRET or _launch.recording_only()))
    if backend == "auto":
        return "triton" if triton_device and logits.dtype != torch.float64 else "torch"
    if backend == "triton":
        if logits.dtype == torch.float64:
            raise TypeError(
                "backend='triton' takes float32/bfloat16/float16 logits; use backend='torch' "
                "for float64"
            )
        if not triton_device:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before aepo.kernels is imported; got logits on {logits.device}"
            )
    return backend


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of the label and full-vocabulary entropy, in one pass over the logits.

    Args:
        logits: [..., V] float32 / bfloat16 / float16 (float64 on the torch backend), CPU or
            CUDA. Any layout whose last dim is contiguous; [B, T, V] slices such as
            ``logits[:, :-1]`` are read in place by the triton backend.
        labels: [...] integer, each in [0, V) or ``ignore_index``.
        temperature: applied as logits / temperature (> 0).
        ignore_index: label of rows to skip: they return 0 and get exactly zero gradient.
        backend: "triton" (fused kernels), "torch" (chunked plain torch) or "auto" (triton on
            CUDA, torch on CPU unless TRITON_INTERPRET=1).
        inplace_grad: backward writes dL/dlogits into the logits' own storage instead of a new
            [..., V] buffer. Only for logits that nothing else reads after this op (e.g. fresh
            lm_head outputs); they are overwritten by the backward.

    Returns:
        (logp, entropy): each [...] float32 (float64 for float64 logits), differentiable with
        respect to ``logits``. Entropy is -sum_j p_j log p_j of softmax(logits / temperature).

    Memory: forward saves 2 floats per row (max, log-sum-exp offset) besides its outputs;
    backward allocates one [..., V] gradient in the logits dtype (none with
    ``inplace_grad``); the torch backend adds a few [chunk, V] fp32 buffers of ~4 MiB each.
    """
    inv_temperature = check_temperature(temperature)
    labels = check_logits_labels(logits, labels, ignore_index)
    if inplace_grad and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "inplace_grad=True would overwrite a leaf tensor with its own gradient; pass logits "
            "produced by an operation (e.g. an lm_head matmul) or use inplace_grad=False"
        )
    if resolve_backend(backend, logits) == "torch":
        return torch_logprobs_and_entropy(
            logits, labels, inv_temperature, ignore_index, inplace_grad
        )
    logp, entropy, _, _ = logprobs_entropy_fwd(
        logits, labels, inv_temperature, ignore_index, inplace_grad
    )
    return logp, entropy


@_launch.gate_exercise
def _gate_exercise(dtype: torch.dtype) -> None:
    """Forward, and the backward with a gradient on logp, on the entropy, and on both."""
    for logits in _launch.gate_logits(dtype):
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long)
        for wrt in ((0,), (1,), (0, 1)):
            x = logits.clone().requires_grad_()
            outs = logprobs_and_entropy(x, labels, backend="triton")
            torch.autograd.grad(sum(outs[i].sum() for i in wrt), x)
