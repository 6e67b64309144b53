"""Timing one call of a GPU (or CPU) op without the traps of asynchronous execution.

Each round: ``setup()`` builds the round's inputs and the device is synchronised, so that
queued setup work (a clone, the forward of a backward benchmark) never lands in the timer. Then:

- CUDA: a sleep kernel is queued first, long enough to cover the host's work, then a start
  event, the call, an end event. The GPU is busy sleeping while Python issues the call, so the
  events measure the device time of the call's kernels alone (``device_ms``), not the host's
  launch overhead; that is measured apart as the host time to issue the call (``host_ms``, a
  host clock around the call without any synchronisation). A call that synchronises inside
  (``.item()``) makes the host wait for the sleep: ``host_bound`` flags it, and its device time
  then includes host gaps.
- CPU: there is nothing asynchronous; ``device_ms`` and ``host_ms`` are both the wall time.

Medians over the rounds, after ``warmup`` untimed rounds (compilation, allocator warm-up).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

SLEEP_FLOOR_MS = 2.0  # the shortest queue pre-fill
SLEEP_CEIL_MS = 200.0  # longer host work than this is host-bound anyway


@dataclass
class Timing:
    device_ms: float  # median device time of one call (CPU: wall time)
    host_ms: float  # median host time to issue one call (CPU: wall time)
    rounds: int
    host_bound: bool = False  # the host outlasted the pre-filled queue in some round
    device_samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _sleep_cycles_per_ms() -> float:
    """Cycles of ``torch.cuda._sleep`` per millisecond, measured with events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    torch.cuda._sleep(cycles // 10)  # the first launch loads the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def _cpu_round(setup: Callable, run: Callable) -> tuple[float, float]:
    args = setup()
    t0 = time.perf_counter()
    run(*args)
    ms = 1e3 * (time.perf_counter() - t0)
    return ms, ms


def _cuda_round(setup: Callable, run: Callable, sleep_cycles: int) -> tuple[float, float]:
    args = setup()
    torch.cuda.synchronize()  # setup's queued work finishes before the timer starts
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(sleep_cycles)  # keeps the GPU busy while the host issues the call
    start.record()
    t0 = time.perf_counter()
    out = run(*args)
    host = 1e3 * (time.perf_counter() - t0)
    end.record()
    end.synchronize()
    del out, args
    return start.elapsed_time(end), host


def measure(
    setup: Callable[[], tuple],
    run: Callable[..., object],
    device: str,
    rounds: int,
    warmup: int = 1,
) -> Timing:
    """Median device and host time of ``run(*setup())`` over ``rounds`` rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if device == "cpu":
        for _ in range(warmup):
            _cpu_round(setup, run)
        samples = [_cpu_round(setup, run) for _ in range(rounds)]
        host_bound, sleep_ms = False, 0.0
    else:
        host_ms = 0.0
        for _ in range(max(warmup, 1)):  # also calibrates the queue pre-fill
            host_ms = max(host_ms, _cuda_round(setup, run, 0)[1])
        sleep_ms = min(max(3 * host_ms, SLEEP_FLOOR_MS), SLEEP_CEIL_MS)
        cycles = int(sleep_ms * _sleep_cycles_per_ms())
        samples = [_cuda_round(setup, run, cycles) for _ in range(rounds)]
        host_bound = any(h > sleep_ms for _, h in samples)
    device_ms = [d for d, _ in samples]
    return Timing(
        device_ms=statistics.median(device_ms),
        host_ms=statistics.median(h for _, h in samples),
        rounds=rounds,
        host_bound=host_bound,
        device_samples=[round(d, 4) for d in device_ms],
    )


def sync(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
