"""The public kernel functions as small ``torch.compile(fullgraph=True)`` cases.

Shared by the CPU test (tests/kernels/test_torch_compile.py: compiled against eager under the
interpreter, and a trace of the GPU registration in a subprocess, ``python -m
tests.kernels.compile_cases OUT.json``) and the CUDA test (tests/kernels/test_gpu.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aepo.kernels import (
    _launch,
    fused_linear_policy_loss,
    fused_policy_loss,
    linear_logprobs_and_entropy,
    logprobs_and_entropy,
)

B, T, V, H = 2, 5, 37, 16  # small: the interpreter pays ~1 ms per block iteration
TEMPERATURE = 0.7
LOSS_KW = {"entropy_coef": 0.01}  # both upstream gradients (dL/dlogp and dL/dH) are nonzero
LOGITS_KERNELS = {"_logp_entropy_fwd_kernel", "_logp_entropy_bwd_kernel"}
LINEAR_KERNELS = LOGITS_KERNELS  # the triton hidden-state backend: cuBLAS GEMMs + these


@dataclass(frozen=True)
class Case:
    """``fn(*leaves, labels, old_logp, advantages, mask)`` -> differentiable outputs."""

    name: str
    fn: Callable[..., tuple[torch.Tensor, ...]]
    leaves: Callable[[torch.device, int], tuple[torch.Tensor, ...]]  # (device, T) -> leaves
    backend: str
    kernels: set[str]  # what the triton backend launches, forward and backward
    exact: bool  # compiled runs the very kernels eager runs, on the same rows: bitwise equal


def _tokens(device: torch.device, t: int) -> tuple[torch.Tensor, ...]:
    """(labels [B, t-1] with an ignored row, old_logp, advantages, mask [B, t-1])."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, V, (B, t - 1), generator=gen)
    mask = torch.ones(B, t - 1)
    mask[0, :2] = 0  # prompt tokens
    labels[1, 0] = -100
    mask[1, 0] = 0
    old_logp = -torch.rand(B, t - 1, generator=gen) * 3
    advantages = torch.randn(B, t - 1, generator=gen)
    return tuple(x.to(device) for x in (labels, old_logp, advantages, mask))


def _logits(device: torch.device, t: int) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return ((torch.randn(B, t, V, generator=gen) * 4).to(device),)


def _hidden_weight(device: torch.device, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, t, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    return hidden.to(device), weight.to(device)


def _logits_cases(backend: str, inplace: bool) -> list[Case]:
    kw = {"temperature": TEMPERATURE, "backend": backend, "inplace_grad": inplace}

    def lp_ent(x, labels, *_):
        logits = (x * 1)[:, :-1]  # a strided [B, T-1, V] view of a non-leaf, as lm_head gives
        return logprobs_and_entropy(logits, labels, **kw)

    def loss(x, labels, old_logp, advantages, mask):
        logits = (x * 1)[:, :-1]
        out, _ = fused_policy_loss(logits, labels, old_logp, advantages, mask, **kw, **LOSS_KW)
        return (out,)

    tag = f"{backend}-{'inplace' if inplace else 'copy'}"
    return [
        Case(f"logprobs_and_entropy-{tag}", lp_ent, _logits, backend, LOGITS_KERNELS, True),
        # Compiled, the loss is policy_loss(*logprobs_and_entropy(...)): its gradient is formed
        # in another order than eager's precomputed one.
        Case(f"fused_policy_loss-{tag}", loss, _logits, backend, LOGITS_KERNELS, False),
    ]


def _linear_cases(backend: str) -> list[Case]:
    kw = {"temperature": TEMPERATURE, "backend": backend}

    def lp_ent(x, w, labels, *_):
        return linear_logprobs_and_entropy(x[:, :-1], w, labels, **kw)

    def loss(x, w, labels, old_logp, advantages, mask):
        out, _ = fused_linear_policy_loss(
            x[:, :-1], w, labels, old_logp, advantages, mask, **kw, **LOSS_KW
        )
        return (out,)

    def case(name, fn):
        # Compiled, the ignored rows are computed too (then masked): matmuls of other sizes.
        return Case(f"{name}-{backend}", fn, _hidden_weight, backend, LINEAR_KERNELS, False)

    return [case("linear_logprobs_and_entropy", lp_ent), case("fused_linear_policy_loss", loss)]


CASES = [
    *(
        c
        for b in ("triton", "torch")
        for inplace in (False, True)
        for c in _logits_cases(b, inplace)
    ),
    *(c for b in ("triton", "torch") for c in _linear_cases(b)),
]
DYNAMIC = ("logprobs_and_entropy-triton-copy", "linear_logprobs_and_entropy-triton")


def run(
    case: Case, fn: Callable, device: torch.device, t: int = T
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(outputs, gradients of the leaves) of ``fn`` on the case's inputs with sequence length
    ``t``, for a fixed random upstream gradient on every output."""
    leaves = tuple(x.clone().requires_grad_() for x in case.leaves(device, t))
    outs = fn(*leaves, *_tokens(device, t))
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
    total = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(total, leaves)
    return tuple(o.detach() for o in outs), grads


def assert_same(eager: tuple, compiled: tuple, exact: bool) -> None:
    """Compiled equals eager: bitwise, or to a few fp32 roundings at each tensor's magnitude
    (the same fp32 math in another order: a reordered reduction moves the last bits)."""
    for i, (e, c) in enumerate(zip(eager, compiled, strict=True)):
        atol = 0.0 if exact else 4 * torch.finfo(torch.float32).eps * max(1.0, e.abs().max().item())
        torch.testing.assert_close(c, e, rtol=0, atol=atol, msg=lambda m, i=i: f"tensor {i}: {m}")


def trace_gpu_registration() -> dict[str, dict]:
    """Compile every triton case against the ops as a GPU registers them (``triton_op``, whose
    host code torch.compile runs on FakeTensors), launching nothing (``record_launches(run=
    False)``); the :data:`DYNAMIC` cases again at two more lengths (automatic dynamic shapes).

    Returns name -> {"error": the exception or None, "kernels": names launched}. Needs
    TRITON_INTERPRET unset: the interpreter registers opaque custom ops instead.
    """
    if _launch.INTERPRET:
        raise RuntimeError("tracing the GPU registration needs TRITON_INTERPRET unset")
    runs = [(c, (T,)) for c in CASES if c.backend == "triton"]
    runs += [(c, (T, T + 2, T + 4)) for c in CASES if c.name in DYNAMIC]
    report = {}
    for case, lengths in runs:
        torch._dynamo.reset()
        compiled = torch.compile(case.fn, fullgraph=True, backend="aot_eager")
        error = None
        with _launch.record_launches(run=False) as log:
            try:
                for t in lengths:
                    run(case, compiled, torch.device("cpu"), t)
            except Exception as exc:  # reported, not raised: every case gets its line
                error = f"{type(exc).__name__}: {exc}"[:3000]
        name = case.name + ("-dynamic" if len(lengths) > 1 else "")
        report[name] = {"error": error, "kernels": sorted({k.kernel.fn.__name__ for k in log})}
    return report


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(trace_gpu_registration(), f, indent=1)
