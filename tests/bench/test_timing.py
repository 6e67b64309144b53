"""benchmarks/timing.py against a simulated asynchronous GPU (a host clock, a device queue,
events that fire when the queue reaches them): queued setup work (a 5 GB clone, the forward of
a backward benchmark) must stay out of the timed call, and the host's Python overhead must be
reported apart from the kernels' device time, which it must not inflate."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import timing

CYCLES_PER_MS = 1.98e6


class FakeGPU:
    """Host time ``host`` and the time ``queue`` at which the device finishes what is queued,
    both in ms; kernels start when both the host has issued them and the queue is free."""

    def __init__(self):
        self.host = 0.0
        self.queue = 0.0
        self.syncs = 0

    def work(self, ms: float) -> None:  # host-side Python
        self.host += ms

    def launch(self, ms: float) -> None:
        self.queue = max(self.queue, self.host) + ms

    def synchronize(self) -> None:
        self.syncs += 1
        self.host = max(self.host, self.queue)

    def module(self):
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                gpu.queue = max(gpu.queue, gpu.host)
                self.t = gpu.queue

            def synchronize(self):
                gpu.host = max(gpu.host, self.t)

            def elapsed_time(self, end):
                return end.t - self.t

        cuda = types.SimpleNamespace(
            Event=Event,
            synchronize=self.synchronize,
            _sleep=lambda cycles: self.launch(cycles / CYCLES_PER_MS),
        )
        clock = types.SimpleNamespace(perf_counter=lambda: self.host / 1e3)
        return types.SimpleNamespace(cuda=cuda), clock


@pytest.fixture
def gpu(monkeypatch) -> FakeGPU:
    fake = FakeGPU()
    torch_ns, clock = fake.module()
    monkeypatch.setattr(timing, "torch", torch_ns)
    monkeypatch.setattr(timing, "time", clock)
    return fake


def _round(gpu: FakeGPU, sync_inside: bool = False):
    def setup():
        gpu.work(0.05)
        gpu.launch(100.0)  # the clone of a 5 GB input, queued
        return ()

    def run():
        for _ in range(2):  # two kernels, each issued after 0.15 ms of Python
            gpu.work(0.15)
            gpu.launch(0.12)
            if sync_inside:
                gpu.synchronize()  # an .item() in the op

    return setup, run


def test_device_time_excludes_queued_setup_and_host_overhead(gpu):
    t = timing.measure(*_round(gpu), "cuda", rounds=5)
    assert t.device_ms == pytest.approx(0.24)  # the two kernels, nothing else
    assert t.host_ms == pytest.approx(0.30)  # the Python that issued them
    assert not t.host_bound
    assert t.device_samples == [pytest.approx(0.24)] * 5


def test_a_call_that_synchronises_is_flagged_host_bound(gpu):
    t = timing.measure(*_round(gpu, sync_inside=True), "cuda", rounds=3)
    assert t.host_bound
    assert t.device_ms > 0.24  # includes the host's gaps, and says so


def test_cpu_times_the_call_alone():
    calls = []

    def setup():
        calls.append("setup")
        return (3,)

    def run(x):
        calls.append("run")
        return sum(range(10_000 * x))

    t = timing.measure(setup, run, "cpu", rounds=4, warmup=2)
    assert calls == ["setup", "run"] * 6
    assert t.device_ms == t.host_ms > 0 and t.rounds == 4 and len(t.device_samples) == 4


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.measure(lambda: (), lambda: None, "cpu", rounds=0)
