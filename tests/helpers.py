"""Shared test helpers: the fp64 tolerance rule (STYLE.md) and input makers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0


EPS32 = torch.finfo(torch.float32).eps  # fp32's spacing at 1 (2^-23 = 1.19e-7)


def scale_of(x: torch.Tensor) -> float:
    """The largest |x| (0 for an empty tensor): the magnitude rounding errors scale with."""
    return x.detach().double().abs().max().item() if x.numel() else 0.0


def assert_close_scaled(
    got: torch.Tensor, want: torch.Tensor, rel: float, *, scale: float | None = None, msg=""
) -> None:
    """Elementwise ``|got - want| <= rel * scale``, ``scale`` the largest ``|want|`` unless given.

    Two correct fp computations of a tensor (another summation order, another kernel, another
    CPU) differ by rounding of the terms they summed, whose size is the tensor's magnitude, not
    each element's: an element near 0 of a tensor of size 12 carries errors of fp32's spacing at
    12. So the tolerance is relative to the magnitude, and a ``rel`` of a few ``EPS32`` means a
    few ulps at it. Pass ``scale`` when the terms were larger than the result (a loss that
    cancels, an entropy computed from logits of size ``|z|``)."""
    assert got.shape == want.shape, f"{msg} shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = scale_of(want) if scale is None else scale
    err = max_err(got, want)
    assert err <= rel * scale, f"{msg} max |diff| {err:.3g} > {rel:.3g} x scale {scale:.3g}"


def assert_within_rule(
    name: str, ours: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, out_dtype
) -> None:
    """Our error vs the fp64 reference is at most 2x plain torch's error in the same input
    dtype, plus a floor of a few ulps of our output dtype at the reference's magnitude."""
    assert not torch.isnan(ours).any(), f"{name}: NaN in output (unwritten or invalid)"
    err, base = max_err(ours, ref), max_err(plain, ref)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    floor = 4 * torch.finfo(out_dtype).eps * scale
    assert err <= 2 * base + floor, (
        f"{name}: error {err:.3g} > 2 x plain-torch error {base:.3g} + floor {floor:.3g}"
    )


def make_labels(shape, vocab: int, generator: torch.Generator, ignore_every: int = 5):
    """Random labels with every ``ignore_every``-th row set to -100."""
    labels = torch.randint(0, vocab, shape, generator=generator)
    flat = labels.view(-1)
    if flat.numel() > 1:
        flat[::ignore_every] = -100
    return labels


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, out_dir, timeout_s: float = 180) -> list[dict]:
    """Run ``worker(rank, port, out_dir)`` on ``world`` spawned processes (a gloo group on a
    free port) and load what each saved to ``out_dir/rank{r}.pt``; fails the test on a crash
    (the worker's exception is re-raised) or after ``timeout_s``."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):  # raises ProcessRaisedException if a worker fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
                p.join()
            pytest.fail("distributed workers timed out")
    return [torch.load(f"{out_dir}/rank{r}.pt") for r in range(world)]


def torchrun(worker: Path, *args: str, ranks: int = 2, timeout: float = 600, **env: str):
    """``worker`` under torchrun on ``ranks`` CPU (gloo) ranks with the project importable and
    the torch backends (no Triton interpreter); its CompletedProcess, asserted to exit 0."""
    environ = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **env)
    environ.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    proc = subprocess.run(
        [*cmd, str(worker), *map(str, args)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_rehearsal(cases: str, timeout: float = 600) -> None:
    """Run the pytest file ``cases`` in a fresh process with the nominal ``gpu`` device
    installed before anything else (tests/nominal_device.py: it must precede the process's
    first backward, and it must not leak into the rest of the suite, where transformers would
    see it as an accelerator). Fails with the inner run's output."""
    env = dict(os.environ, AEPO_REHEARSAL="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cases]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
