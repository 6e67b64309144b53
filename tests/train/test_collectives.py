"""Every collective runs on a device its backend takes (issue 18, point 4): nccl reduces CUDA
tensors only, and the loop's metric means and normaliser, the preemption flag, the non-finite
check and the batch entropy statistics all reduce host tensors.

On a CPU-only machine nccl does not exist, so :class:`FakeNccl` stands in for it on top of a
real single-process gloo group: the group reports ``cuda:nccl`` and two ranks, the current
CUDA device is 0, ``Tensor.to("cuda:0")`` gives a CPU copy tagged :class:`OnCuda`, and
``dist.all_reduce`` refuses any untagged tensor with nccl's own error, else reduces it over the
real group and adds the second rank's contribution (``peer``). The code under test runs
unchanged; only the hardware is simulated. The ``cuda`` test at the end does the same over a
real nccl group on a GPU.
"""

from __future__ import annotations

import ast
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from aepo import distributed
from aepo.objectives import entropy_statistics
from aepo.train.config import TrainConfig
from aepo.train.engine import PolicyEngine
from aepo.train.loop import Trainer
from aepo.train.preempt import Preemption

PACKAGE = Path(__file__).resolve().parents[2] / "aepo"
COLLECTIVES = {
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
}
# Kernel call sites that gather or reduce their own inputs (the lm_head shard, the hidden
# states' gradient): on the model's device, CUDA under nccl.
ALLOWED = {
    ("kernels/linear.py", "shard_layout"),
    ("kernels/linear.py", "_gather_merge"),
    ("kernels/linear.py", "_LinearLogpEntropy.backward"),
}


@pytest.fixture
def gloo():
    """A real single-process gloo group (the default group), destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield dist.group.WORLD
    dist.destroy_process_group()


class OnCuda(torch.Tensor):
    """A CPU tensor standing for a CUDA one (no subclass propagation: it marks one copy)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


class _CudaMoves(TorchFunctionMode):
    """``Tensor.to`` a CUDA device gives an :class:`OnCuda` copy; everything else unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, torch.device | str) and torch.device(target).type == "cuda":
                return args[0].detach().clone().as_subclass(OnCuda)
        return func(*args, **kwargs)


class FakeNccl:
    """``dist.all_reduce`` as nccl has it, over the real group plus a simulated peer rank."""

    def __init__(self, real_all_reduce) -> None:
        self.real = real_all_reduce
        self.peer = lambda t: t.clone()  # the other rank's tensor: by default the same values
        self.calls = 0

    def __call__(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not isinstance(tensor, OnCuda):
            raise RuntimeError("No backend type associated with device type cpu")
        plain = tensor.as_subclass(torch.Tensor)  # same storage
        self.real(plain, op=op, group=group)
        other = self.peer(plain)
        if op == dist.ReduceOp.SUM:
            plain += other
        elif op == dist.ReduceOp.MAX:
            torch.maximum(plain, other, out=plain)
        else:
            raise NotImplementedError(op)
        self.calls += 1


@pytest.fixture
def nccl(gloo, monkeypatch):
    fake = FakeNccl(dist.all_reduce)
    monkeypatch.setattr(dist, "all_reduce", fake)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with _CudaMoves():
        yield fake


def _trainer(world: int = 2) -> Trainer:
    trainer = Trainer.__new__(Trainer)  # the reductions only: no engine, no rollout
    trainer.cfg, trainer.rank, trainer.world = TrainConfig(), 0, world
    return trainer


class _Optimizer:
    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


class _DeepSpeedStub:
    """What ``PolicyEngine.step`` touches of a ZeRO stage-0 DeepSpeed engine."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(2, 1)
        for p in self.module.parameters():
            p.grad = torch.ones_like(p)
        self.optimizer = _Optimizer()

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def step(self) -> None:
        self.optimizer.step()


def _policy() -> PolicyEngine:
    policy = PolicyEngine.__new__(PolicyEngine)  # the step's guard only: no model
    policy.engine, policy.stage, policy._own_norm = _DeepSpeedStub(), 0, False
    return policy


# -- the reductions of the loop, the preemption guard and the engine under nccl ----------------


def test_mean_over_ranks_under_nccl(nccl):
    nccl.peer = lambda t: 3 * t  # rank 1 logged three times rank 0's values
    out = distributed.mean_over_ranks({"reward": 1.0, "em": 0.25})
    assert out == {"reward": 2.0, "em": 0.5}
    assert nccl.calls == 1


def test_normalizer_under_nccl(nccl):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # 3 tokens here, 3 on the peer
    assert _trainer()._normalizer(mask) == 6.0
    assert nccl.calls == 1


def test_preemption_signal_on_the_other_rank_under_nccl(nccl):
    with Preemption() as guard:
        assert guard.requested() is None
        nccl.peer = lambda t: torch.full_like(t, float(signal.SIGTERM))
        assert guard.requested() == signal.SIGTERM
    assert nccl.calls == 2


def test_nonfinite_loss_on_the_other_rank_skips_the_step_under_nccl(nccl):
    policy = _policy()
    assert policy.step(torch.tensor(False)) is True
    assert policy.engine.optimizer.steps == 1
    nccl.peer = lambda t: torch.tensor([1.0, 0.0])  # rank 1: NaN loss, finite gradients
    assert policy.step(torch.tensor(False)) is False
    assert policy.skip_reason == "loss" and policy.engine.optimizer.steps == 1
    assert all((p.grad == 0).all() for p in policy.engine.module.parameters())
    assert nccl.calls == 2


def test_batch_entropy_statistics_of_host_tensors_under_nccl(nccl):
    """The loop's entropies live on the host (``Trainer._recompute``)."""
    h = torch.tensor([[0.5, 1.0, 2.0], [0.1, 3.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    mean, std = entropy_statistics(h, m, norm="batch", process_group=dist.group.WORLD)
    both = entropy_statistics(torch.cat([h, h]), torch.cat([m, m]), norm="micro")
    torch.testing.assert_close((mean, std), both, rtol=1e-12, atol=0)
    assert nccl.calls == 2


def test_plain_all_reduce_of_a_host_tensor_is_refused(nccl):
    """The simulation's premise: what today's call sites did fails under it."""
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.all_reduce(torch.zeros(2))


def test_no_collective_on_tensors_outside_the_helper():
    """Every torch.distributed tensor collective in aepo/ goes through aepo.distributed,
    except kernel call sites on their inputs' own device (``ALLOWED``)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel != "distributed.py":
            found += [(rel, where) for where in _collective_calls(ast.parse(path.read_text()))]
    assert sorted(set(found) - ALLOWED) == []
    assert not ALLOWED - set(found), "stale ALLOWED entry"


def _collective_calls(tree: ast.Module) -> list[str]:
    """Qualified names of the functions calling ``dist.<collective>`` or
    ``torch.distributed.<collective>`` (``<module>`` at top level)."""
    out = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = child.name if scope == "<module>" else f"{scope}.{child.name}"
            if isinstance(child, ast.Call) and _is_collective(child.func):
                out.append(scope)
            if isinstance(child, ast.ImportFrom) and child.module == "torch.distributed":
                out.extend(scope for a in child.names if a.name in COLLECTIVES)
            visit(child, inner)

    visit(tree, "<module>")
    return out


def _is_collective(func: ast.expr) -> bool:
    if not isinstance(func, ast.Attribute) or func.attr not in COLLECTIVES:
        return False
    base = func.value
    if isinstance(base, ast.Name):
        return base.id == "dist"
    return (
        isinstance(base, ast.Attribute)
        and base.attr == "distributed"
        and isinstance(base.value, ast.Name)
        and base.value.id == "torch"
    )


# -- the helper's device choice ----------------------------------------------------------------


def test_gloo_reduces_on_the_cpu(gloo):
    assert set(distributed.backend_devices()) == {"cpu", "cuda"}
    assert distributed.collective_device() == torch.device("cpu")


def test_mixed_group_reduces_host_tensors_on_the_cpu(gloo):
    dist.destroy_process_group()  # the fixture's; this one maps devices explicitly
    dist.init_process_group("cpu:gloo,cuda:gloo", rank=0, world_size=1, store=dist.HashStore())
    assert distributed.backend_devices() == ("cpu", "cuda")
    assert distributed.collective_device(dist.group.WORLD) == torch.device("cpu")


@pytest.mark.parametrize(
    "config, device",
    [("cuda:nccl", "cuda:3"), ("cpu:gloo,cuda:nccl", "cpu"), ("cpu:gloo,cuda:gloo", "cpu")],
)
def test_device_choice_by_backend_config(gloo, monkeypatch, config, device):
    sub = dist.new_group([0])
    configs = {sub: config}  # the group asked about, not the default group
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: configs[group])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device(sub) == torch.device(device)


def test_supported_device_is_reduced_in_place(gloo, monkeypatch):
    """gloo, or the cpu half of cpu:gloo,cuda:nccl: no copy of a host tensor."""
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op, group: seen.append(t))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
    x = torch.ones(3)
    assert distributed.all_reduce(x) is x and seen[0] is x


def test_one_rank_or_none_is_a_no_op(gloo, monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", None)  # any call would fail
    x = torch.ones(3)
    assert distributed.all_reduce(x) is x
    dist.destroy_process_group()
    assert distributed.all_reduce(x) is x
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())  # for teardown


def test_host_tensor_round_trip_under_nccl(nccl):
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce(x, op=dist.ReduceOp.MAX) is x
    assert type(x) is torch.Tensor and x.tolist() == [1.0, 2.0] and nccl.calls == 1


# -- a real nccl group (single process, reported as two ranks so that nothing is skipped) ------


@pytest.mark.cuda
def test_reductions_over_a_real_nccl_group(cuda, monkeypatch):
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", rank=0, world_size=1, store=dist.HashStore(), device_id=torch.device("cuda", 0)
    )
    try:
        with pytest.raises(RuntimeError):
            dist.all_reduce(torch.ones(1))  # the bug: nccl refuses host tensors
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        assert distributed.collective_device() == torch.device("cuda", 0)
        assert distributed.mean_over_ranks({"a": 2.0, "b": 4.0}) == {"a": 1.0, "b": 2.0}
        assert _trainer()._normalizer(torch.tensor([[1, 1, 0]])) == 2.0
        with Preemption() as guard:
            assert guard.requested() is None
        assert _policy().step(torch.tensor(True, device=cuda)) is False
        h, m = torch.tensor([0.5, 1.0, 2.0]), torch.ones(3)
        stats = entropy_statistics(h, m, norm="batch", process_group=dist.group.WORLD)
        torch.testing.assert_close(stats, entropy_statistics(h, m, norm="micro"))
        on_gpu = torch.ones(2, device=cuda)
        assert distributed.all_reduce(on_gpu) is on_gpu  # reduced where it is
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
