"""Accuracy table: our kernels' error against float64 next to plain torch's in the same dtype.

The rule every kernel test applies (``tests/helpers.assert_within_rule``): our maximum absolute
error against a float64 reference is at most 2x plain torch's (the same math in the input
dtype through autograd) plus a few ulps. This writes the measured errors and their ratio for
the logits kernels (forward logp / entropy, backward d logits) and the hidden-state single pass
(loss, d hidden, d weight), including the two cases other fused kernels got wrong: a peaked
weight at V=152064 and all-negative logits at temperature 0.3.

On CUDA it measures the compiled kernels; without CUDA it sets TRITON_INTERPRET=1 (before
aepo.kernels is imported) and measures the same kernels through Triton's interpreter.

    python benchmarks/accuracy.py [--out benchmarks/results/accuracy_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from aepo.kernels import (
    fused_linear_policy_loss,
    logprobs_and_entropy,
    naive_linear_logprobs_and_entropy,
    naive_logprobs_and_entropy,
)
from aepo.objectives import policy_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOSS_KW = {"objective": "aepo", "entropy_coef": 0.5, "entropy_stats": (2.5, 0.8)}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def _logits_case(n: int, v: int, dtype, device, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, v, generator=g)).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    grads = [torch.randn(n, generator=g).to(device) for _ in range(2)]
    return logits, labels, grads


def _logits_outputs(fn, logits, labels, grads, temperature):
    """(logp, entropy, d logits) of ``fn`` with upstream gradients ``grads`` on both."""
    x = logits.detach().clone().requires_grad_()
    logp, ent = fn(x, labels, temperature)
    (dx,) = torch.autograd.grad((logp * grads[0]).sum() + (ent * grads[1]).sum(), x)
    return logp, ent, dx


def logits_rows(device) -> list[tuple]:
    ours = lambda x, y, t: logprobs_and_entropy(x, y, temperature=t, backend="triton")
    plain = lambda x, y, t: naive_logprobs_and_entropy(x, y, t)
    rows = []
    cases = [("random, V=32000", 32, 32000, 1.0), ("random, V=152064, T=0.7", 16, 152064, 0.7)]
    for name, n, v, t in cases:
        for dname, dtype in DTYPES.items():
            logits, labels, grads = _logits_case(n, v, dtype, device, seed=v + n)
            o = _logits_outputs(ours, logits, labels, grads, t)
            p = _logits_outputs(plain, logits, labels, grads, t)
            r = _logits_outputs(plain, logits.double(), labels, grads, t)
            for out, a, b, c in zip(("logp", "entropy", "d logits"), o, p, r, strict=True):
                rows.append(("logits", name, dname, out, max_err(a, c), max_err(b, c)))
    return rows


def _linear_case(kind: str, dtype, device):
    """(hidden [1, N, H], weight [V, H], labels, old_logp, advantages, mask, temperature)."""
    g = torch.Generator().manual_seed(7)
    if kind == "peaked":
        n, h, v, t = 24, 16, 152064, 1.0
        weight = torch.zeros(v, h)
        weight[:, 0], weight[0, 0] = -15.0, 3.0
        hidden = torch.zeros(1, n, h)
        hidden[..., 0] = 1.0
        hidden[..., 1:] = 0.1 * torch.randn(1, n, h - 1, generator=g)
    elif kind == "negative":
        n, h, v, t = 30, 32, 300, 0.3
        hidden = torch.randn(1, n, h, generator=g).abs() + 0.5
        weight = -(torch.randn(v, h, generator=g).abs() + 40.0 / h)
    else:
        n, h, v, t = 64, 64, 4099, 1.0
        hidden = torch.randn(1, n, h, generator=g)
        weight = 0.5 * torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (1, n), generator=g)
    old = -4.0 + 0.3 * torch.randn(1, n, generator=g)
    adv, mask = torch.randn(1, n, generator=g), torch.ones(1, n)
    cast = lambda x: x.to(dtype).to(device)
    return cast(hidden), cast(weight), *(x.to(device) for x in (labels, old, adv, mask)), t


def _linear_outputs(fn, case, dtype):
    hidden, weight, labels, old, adv, mask, t = case
    x = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    loss = fn(x, w, labels, old, adv, mask, t)
    return (loss, *torch.autograd.grad(loss, (x, w)))


def linear_rows(device) -> list[tuple]:
    kw = LOSS_KW | {"entropy_stats": tuple(torch.tensor(s) for s in LOSS_KW["entropy_stats"])}

    def ours(x, w, labels, old, adv, mask, t):
        out = fused_linear_policy_loss(x, w, labels, old, adv, mask, temperature=t, **kw)
        return out[0]

    def plain(x, w, labels, old, adv, mask, t):
        logp, ent = naive_linear_logprobs_and_entropy(x, w, labels, t)
        return policy_loss(logp, old, adv, mask, entropy=ent, **kw)[0]

    rows = []
    kinds = {
        "random": "random, V=4099",
        "peaked": "peaked W, V=152064",
        "negative": "logits <= -40, T=0.3",
    }
    for kind, name in kinds.items():
        for dname in ("bf16", "fp16"):
            dtype = DTYPES[dname]
            case = _linear_case(kind, dtype, device)
            o, p = _linear_outputs(ours, case, dtype), _linear_outputs(plain, case, dtype)
            r = _linear_outputs(plain, case, torch.float64)
            for out, a, b, c in zip(("loss", "d hidden", "d weight"), o, p, r, strict=True):
                rows.append(
                    ("hidden-state single pass", name, dname, out, max_err(a, c), max_err(b, c))
                )
    return rows


def render(rows: list[tuple], device: str) -> str:
    head = [
        f"# Accuracy against float64 ({device})",
        "",
        "Written by `python benchmarks/accuracy.py`. Max absolute error of ours and of plain torch",
        "(autograd in the input dtype) against the float64 reference; the tests' rule is",
        "ours <= 2 x plain + 4 ulps of the output dtype. Logits kernels: `logprobs_and_entropy`",
        "(backend triton) with upstream gradients on logp and entropy. Hidden-state: the 6NHV",
        "single pass of `fused_linear_policy_loss` (AEPO objective with an entropy bonus).",
        "",
        "| path | case | dtype | output | ours | plain torch | ours / plain |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    body = [
        f"| {p} | {c} | {d} | {o} | {a:.3g} | {b:.3g} | {a / b if b else float('nan'):.2f} |"
        for p, c, d, o, a, b in rows
    ]
    return "\n".join(head + body) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    default = (
        Path(__file__).parent / "results" / ("accuracy_cuda.md" if cuda else "accuracy_cpu.md")
    )
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    rows = logits_rows(device) + linear_rows(device)
    text = render(rows, name)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
