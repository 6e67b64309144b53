"""torch.compile(fullgraph=True) over every public kernel function, forward and backward.

Two checks, because the interpreter and a GPU register the ops differently:
- under the interpreter the ops are opaque custom ops with fakes: compiled equals eager, both
  backends, with and without ``inplace_grad``;
- in a subprocess without TRITON_INTERPRET the ops are registered as on a GPU (``triton_op``,
  whose host code torch.compile runs on FakeTensors): every triton case traces through its
  forward and backward kernels, launching nothing. This is the check that catches a pointer
  or a value read in the ops' host code (``data_ptr()``, ``.item()``, ``.tolist()``, numpy).
Also: the logits kernels' row addressing, decided from strides alone, per layout on real and
on fake tensors; the hidden-state ops' fakes through torch.library.opcheck.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from aepo.kernels import linear_gemm
from aepo.kernels.logprob_entropy import rows_in_place
from tests.kernels import compile_cases
from tests.kernels.compile_cases import CASES, DYNAMIC, assert_same, run

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_matches_eager(case):
    torch._dynamo.reset()
    compiled = torch.compile(case.fn, fullgraph=True, backend="aot_eager")
    eager_out, eager_grads = run(case, case.fn, CPU)
    out, grads = run(case, compiled, CPU)
    assert_same(eager_out + eager_grads, out + grads, case.exact)


@pytest.fixture(scope="module")
def gpu_trace(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trace") / "trace.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", compile_cases.__name__, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


TRACED = [c.name for c in CASES if c.backend == "triton"] + [f"{n}-dynamic" for n in DYNAMIC]


@pytest.mark.parametrize("name", TRACED)
def test_gpu_registration_traces(gpu_trace, name):
    result = gpu_trace[name]
    assert result["error"] is None, result["error"]
    case = next(c for c in CASES if c.name == name.removesuffix("-dynamic"))
    assert set(result["kernels"]) == case.kernels, "a kernel was not reached by the trace"


def _arange(*shape):
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)


# name -> (tensor [..., V], whether its rows are addressable without a copy)
LAYOUTS = {
    "N-V": (_arange(3, 7), True),
    "V": (_arange(7), True),
    "B-T-V-sliced": (_arange(2, 4, 7)[:, :-1], True),
    "B-1-T-V-sliced": (_arange(2, 1, 4, 7)[:, :, :-1], True),
    "B-T-transposed": (_arange(4, 2, 7).transpose(0, 1), True),
    "V-sliced": (_arange(3, 9)[:, 1:8], True),
    "two-sliced-dims": (_arange(2, 3, 4, 7)[:, :-1, :-1], False),
    "V-strided": (_arange(7, 3).t(), False),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_rows_in_place_from_strides_alone(name):
    """Row addressing of the logits kernels: right for every layout, and the same on
    FakeTensors (what torch.compile traces a GPU op's host code with)."""
    x, in_place = LAYOUTS[name]
    got = rows_in_place(x)
    assert (got is not None) == in_place
    with FakeTensorMode() as mode:
        fake = rows_in_place(mode.from_tensor(x))
    assert (fake is None) == (got is None)
    if got is None:
        return
    assert fake[1:] == got[1:]
    base, t, stride_b, stride_t = got
    for r, row in enumerate(x.reshape(-1, x.shape[-1])):
        offset = base.storage_offset() + (r // t) * stride_b + (r % t) * stride_t
        assert torch.equal(base.as_strided((x.shape[-1],), (1,), offset), row), r


@pytest.mark.parametrize("terms", ["both", "logp", "entropy"])
def test_opcheck_linear_ops(terms):
    """The hidden-state ops' fakes (what torch.compile traces with) match what they return."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 16, generator=gen), torch.randn(37, 16, generator=gen)
    local = torch.randint(-1, 37, (9,), generator=gen)  # -1: the label is in another shard
    forward, backward = linear_gemm._linear_forward_op, linear_gemm.linear_backward
    torch.library.opcheck(forward, (x, w, local, 1.0 / 0.7))
    m, s, u, _ = forward(x, w, local, 1.0 / 0.7)
    log_s = s.log()
    g_lp = torch.randn(9, generator=gen) if terms in ("both", "logp") else None
    g_h = torch.randn(9, generator=gen) if terms in ("both", "entropy") else None
    args = (x, w, local, m, log_s, log_s - u / s, g_lp, g_h, 1.0 / 0.7)
    torch.library.opcheck(backward, args)
