"""Kernel benchmark suite (pytest runs it): per-token log-prob + entropy and the fused policy
loss over logits, with peers.

Ops: ``fwd`` (logp and entropy of every token, with autograd recording), ``bwd`` (the backward
of sum(g_lp * logp + g_h * entropy); its forward runs in the round's setup, finished before the
timer starts) and ``loss`` (AEPO policy loss with an entropy bonus, forward + backward).
Implementations, in the order they run (ours first, ``torch.compile`` last: its compile time is
the largest unknown): ``aepo`` (triton on CUDA, the chunked torch backend on CPU),
``aepo-inplace`` (gradient written into the logits), ``naive`` (log_softmax + gather + softmax
entropy in eager torch), ``trl`` (TRL 1.16's Triton log-prob + entropy kernel, CUDA), Liger-Kernel's
Triton ``cross_entropy`` and ``grpo_loss`` (CUDA, ``loss`` only: see COMPUTES for what each
computes) and ``compiled`` (``torch.compile`` of the naive code, CUDA). Every implementation
reads the same contiguous [B, T, V] logits (``logits[:, :-1]`` of a [B, T+1, V] lm_head
output), except Liger's GRPO loss, which takes the [B, T+1, V] tensor itself, as it expects.

Timing (``timing.measure``): CUDA events around the call with the queue pre-filled, so
``device_ms`` is kernel time; ``host_ms`` is the host time to issue one call, reported apart.
Each row, written to ``--rows`` (JSON lines) the moment it is measured, also has the bytes
moved (fwd reads the logits once, bwd reads them and writes the gradient, loss does both), the
peak extra memory of one warm round above its inputs (for bwd, above the state its forward
left) and on CUDA the bandwidth floor (bytes / measured device copy bandwidth) and
``x_floor = device_ms / floor_ms``; for ours also the cost model's time
(``logprob_entropy.cost_model``: bytes, FLOPs, exp2 and SASS instructions against the ceilings
measured on this GPU, ``device_ceilings`` in benchmarks/conftest.py) and
``x_model = device_ms / model_ms``.

    pytest benchmarks/bench_kernels.py --rows out.jsonl                       # CPU defaults
    pytest benchmarks/bench_kernels.py --device cuda --n 16384 --vocab 151936 --dtype bf16
    python benchmarks/render_bench.py out.jsonl                               # markdown tables
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

from aepo.kernels import (
    _checks,
    fused_policy_loss,
    logprob_entropy,
    logprobs_and_entropy,
    naive_logprobs_and_entropy,
)
from aepo.objectives import policy_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers
import timing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("aepo", "aepo-inplace", "aepo-e2e", "naive", "trl", "liger-ce", "liger-grpo", "compiled")
OPS = ("fwd", "bwd", "loss")
GPU_ONLY = {"compiled", "trl", "liger-ce", "liger-grpo"}
LOSS_ONLY = {"liger-ce", "liger-grpo"}
PEER = {"trl": "trl-triton", "liger-ce": "liger", "liger-grpo": "liger"}
LOSS_KW = {"objective": "aepo", "entropy_coef": 0.01}
COMPUTES = {
    "naive": "logp + entropy (+ AEPO loss); autograd over [N, V] fp32 intermediates",
    "compiled": "the naive code through torch.compile",
    "aepo": "logp + entropy (+ AEPO loss with entropy bonus); one pass fwd, one pass bwd",
    "aepo-inplace": "as aepo, gradient written into the logits' storage",
    "aepo-e2e": "as aepo through the public API end to end, its label range check (one host "
    "sync) included; the aepo rows skip it (labels validated once)",
    "trl": "TRL's Triton kernel: logp + entropy in one pass fwd, one pass bwd "
    "(+ the AEPO loss in eager torch on its outputs)",
    "liger-ce": "Liger cross entropy: logp only (no entropy, no policy loss); gradient "
    "computed in the forward and written into its input",
    "liger-grpo": "Liger Triton GRPO loss (clipped ratio, no entropy, no dual clip)",
}
BYTES_PER_ELEMENT_PASS = {"fwd": 1, "bwd": 2, "loss": 3}


@dataclass
class Case:
    full: torch.Tensor  # [B, T+1, V], as an lm_head writes it
    logits: torch.Tensor  # [B, T, V] contiguous: full[:, :-1]
    labels: torch.Tensor  # [B, T]
    old_logp: torch.Tensor  # [B, T] fp32
    seq_adv: torch.Tensor  # [B] fp32 (one advantage per sequence)
    mask: torch.Tensor  # [B, T] fp32
    g_lp: torch.Tensor  # [B, T] upstream gradient of logp (bwd op)
    g_h: torch.Tensor  # [B, T] upstream gradient of entropy (bwd op)

    @property
    def advantages(self) -> torch.Tensor:
        return self.seq_adv[:, None].expand_as(self.mask)


def make_case(n: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> Case:
    t = min(n, 1024)
    b = n // t
    gen = torch.Generator(device=device).manual_seed(seed)
    full = (torch.randn(b, t + 1, vocab, generator=gen, device=device) * 3).to(dtype)
    logits = full[:, :-1].contiguous()
    labels = torch.randint(0, vocab, (b, t), generator=gen, device=device)
    with torch.no_grad():
        old = logprobs_and_entropy(logits, labels)[0]
    old = old + 0.1 * torch.randn(b, t, generator=gen, device=device)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device)
    mask = torch.ones(b, t, device=device)
    return Case(full, logits, labels, old.float(), rand(b), mask, rand(b, t), rand(b, t))


def _policy_loss(logp: torch.Tensor, ent: torch.Tensor, case: Case) -> torch.Tensor:
    return policy_loss(logp, case.old_logp, case.advantages, case.mask, entropy=ent, **LOSS_KW)[0]


def _naive_loss(x: torch.Tensor, case: Case) -> torch.Tensor:
    return _policy_loss(*naive_logprobs_and_entropy(x, case.labels), case)


@functools.cache
def _compiled(kind: str):
    fn = _naive_loss if kind == "loss" else (lambda x, y: naive_logprobs_and_entropy(x, y))
    return torch.compile(fn, dynamic=False)


def _kernel_row(impl: str):
    """For the aepo kernel rows, the public API without its label range check: a host sync
    (``bool(bad.any())``) that, behind the timer's pre-filled queue, waits for it and leaves
    the GPU idle while the rest is issued, inside the events (GPU_AUDIT 2.1). The case's
    labels are valid by construction; ``aepo-e2e`` keeps the check, as a caller gets it."""
    if impl not in ("aepo", "aepo-inplace"):
        return contextlib.nullcontext()
    return mock.patch.object(_checks, "_check_label_range", lambda *args: None)


def forward(impl: str, x: torch.Tensor, case: Case):
    """(logp, entropy) [B, T] from logits ``x`` [B, T, V]."""
    if impl == "naive":
        return naive_logprobs_and_entropy(x, case.labels)
    if impl == "compiled":
        return _compiled("fwd")(x, case.labels)
    if impl == "trl":
        return peers.trl_kernel("logprob_entropy").selective_log_softmax_and_entropy(x, case.labels)
    backend = "triton" if x.is_cuda else "torch"
    with _kernel_row(impl):
        return logprobs_and_entropy(
            x, case.labels, backend=backend, inplace_grad=impl == "aepo-inplace"
        )


def _liger_loss(impl: str, x: torch.Tensor, case: Case) -> torch.Tensor:
    if impl == "liger-ce":
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

        out = LigerCrossEntropyFunction.apply(
            x, case.labels.reshape(-1), None, -100, 0.0, 0.0, "sum"
        )
        return out[0] if isinstance(out, tuple) else out
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    out = triton_grpo_loss(
        x,
        case.old_logp,
        None,
        case.labels,
        case.seq_adv,
        case.mask,
        temperature=1.0,
        beta=0.0,
        eps_low=0.2,
        eps_high=0.2,
        inplace=False,
        loss_type="grpo",
        reduce=True,
    )
    return out[0] if isinstance(out, tuple) else out


def loss(impl: str, x: torch.Tensor, case: Case) -> torch.Tensor:
    """Scalar loss from logits ``x`` ([B, T, V]; [N, V] for liger-ce, [B, T+1, V] for
    liger-grpo)."""
    if impl == "naive":
        return _naive_loss(x, case)
    if impl == "compiled":
        return _compiled("loss")(x, case)
    if impl == "trl":
        return _policy_loss(*forward(impl, x, case), case)
    if impl.startswith("liger"):
        return _liger_loss(impl, x, case)
    backend = "triton" if x.is_cuda else "torch"
    kw = {"backend": backend, "inplace_grad": impl == "aepo-inplace", **LOSS_KW}
    with _kernel_row(impl):
        return fused_policy_loss(x, case.labels, case.old_logp, case.advantages, case.mask, **kw)[0]


def _input(impl: str, case: Case) -> torch.Tensor:
    """A differentiable logits tensor for one round; fresh where the op overwrites it."""
    if impl == "liger-ce":  # writes its gradient into its input during the forward
        return case.logits.view(-1, case.logits.shape[-1]).clone().requires_grad_()
    if impl == "liger-grpo":
        return case.full.detach().requires_grad_()
    if impl == "aepo-inplace":
        return case.logits.clone().requires_grad_().view(case.logits.shape)  # a non-leaf
    return case.logits.detach().requires_grad_()


def rounds(impl: str, op: str, case: Case):
    """(setup, run) of one round: setup builds its inputs (and, for bwd, runs the forward);
    ``timing.measure`` finishes setup's queued work before it times ``run``."""
    if op == "fwd":
        setup = lambda: (_input(impl, case),)
        run = lambda x: forward(impl, x, case)
    elif op == "bwd":

        def setup():
            x = _input(impl, case)
            logp, ent = forward(impl, x, case)
            return x, (logp * case.g_lp + ent * case.g_h).sum()

        run = lambda x, y: torch.autograd.grad(y, x)
    else:
        setup = lambda: (_input(impl, case),)
        run = lambda x: torch.autograd.grad(loss(impl, x, case), x)
    return setup, run


def skip_reason(impl: str, op: str, device: str) -> str | None:
    if impl in GPU_ONLY and device != "cuda":
        return f"{impl}: GPU stage only"
    if impl in LOSS_ONLY and op != "loss":
        return f"{impl}: compared on the loss (fwd+bwd) only"
    if impl == "aepo-inplace" and op == "fwd":
        return "aepo-inplace: same forward as aepo"
    if impl == "aepo-e2e" and op == "bwd":
        return "aepo-e2e: the backward checks nothing (same as aepo)"
    return peers.missing(PEER[impl]) if impl in PEER else None


def peak_extra_bytes(impl: str, op: str, case: Case) -> int:
    """CUDA: peak memory of one (warm) round above what its setup left (inputs, bwd's
    forward)."""
    setup, run = rounds(impl, op, case)
    args = setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(*args)
    torch.cuda.synchronize()
    del args
    return torch.cuda.max_memory_allocated() - base


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_peak(impl: str, op: str, n: int, vocab: int, dtype: str) -> int:
    """Peak resident-set growth of one round, in a fresh process (so that one variant's
    allocator cache cannot hide another's)."""
    cmd = [sys.executable, __file__, "--peak", impl, op, str(n), str(vocab), dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def _cpu_peak_child(impl: str, op: str, n: int, vocab: int, dtype: str) -> None:
    small = make_case(4, 64, DTYPES[dtype], "cpu")  # warm-up: first-call allocations
    setup, run = rounds(impl, op, small)
    run(*setup())
    case = make_case(n, vocab, DTYPES[dtype], "cpu")
    setup, run = rounds(impl, op, case)
    args = setup()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = _rss_kib("VmRSS")
    run(*args)
    print(json.dumps({"peak_extra_bytes": (_rss_kib("VmHWM") - base) * 1024}))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    return cpu[0].split(":", 1)[1].strip() if cpu else "cpu"


def model_ms(
    impl: str, op: str, n: int, vocab: int, element_size: int, device: dict
) -> float | None:
    """The time the logits kernels' cost model predicts at ``device``'s ceilings (the measured
    ``device_ceilings``; :func:`aepo.kernels.logprob_entropy.cost_model`) for our
    implementations; ``loss`` is a forward and a backward with both gradients (the [N]-sized
    objective is not modelled)."""
    if not impl.startswith("aepo"):
        return None
    kernels = {"fwd": ("fwd",), "bwd": ("bwd",), "loss": ("fwd", "bwd")}[op]
    cost = lambda k: logprob_entropy.cost_model(k, n, vocab, element_size, device=device)
    return sum(cost(k)["model_ms"] for k in kernels)


@functools.lru_cache(maxsize=1)  # one case alive at a time: they are GBs on the GPU
def _case(n: int, vocab: int, dtype: str, device: str) -> Case:
    return make_case(n, vocab, DTYPES[dtype], device)


@pytest.mark.parametrize(
    "impl, op", [(i, o) for i in IMPLS for o in OPS], ids=[f"{i}-{o}" for i in IMPLS for o in OPS]
)
def test_kernel(bench_cfg, device_ceilings, record_row, vocab, impl, op):
    reason = skip_reason(impl, op, bench_cfg.device)
    if reason:
        pytest.skip(reason)
    cfg = bench_cfg
    case = _case(cfg.n, vocab, cfg.dtype, cfg.device)
    t = timing.measure(*rounds(impl, op, case), cfg.device, cfg.rounds, warmup=1)
    if cfg.device == "cuda":  # after the warm-up: compiled code and caches exist
        peak = peak_extra_bytes(impl, op, case)
    else:
        peak = cpu_peak(impl, op, cfg.n, vocab, cfg.dtype)
    nbytes = BYTES_PER_ELEMENT_PASS[op] * cfg.n * vocab * case.logits.element_size()
    row = {"suite": "kernels", "impl": impl, "op": op, "computes": COMPUTES[impl], "n": cfg.n}
    row |= {"vocab": vocab, "dtype": cfg.dtype, "device": cfg.device, "bytes": nbytes}
    row |= {"peak_extra_bytes": peak, "device_name": device_name(cfg.device), **t.as_dict()}
    if device_ceilings:  # CUDA: the floor and the model at this GPU's measured ceilings
        bandwidth = device_ceilings["bytes_per_s"]
        floor_ms = 1e3 * nbytes / bandwidth
        row |= {"copy_bandwidth_GBps": bandwidth / 1e9, "floor_ms": floor_ms}
        row["x_floor"] = t.device_ms / floor_ms
        model = model_ms(impl, op, cfg.n, vocab, case.logits.element_size(), device_ceilings)
        if model:
            row |= {"model_ms": model, "x_model": t.device_ms / model}
    record_row(row)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        impl, op, n, vocab, dtype = sys.argv[2:7]
        _cpu_peak_child(impl, op, int(n), int(vocab), dtype)
