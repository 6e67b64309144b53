"""The benchmarks' peers compute what their rows say: TRL's kernels, called the way the
benchmarks call them, give the naive code's loss and gradients (so a timing compares like with
like), and a peer that is absent is named, not crashed on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_kernels
import bench_linear
import peers

from tests.helpers import assert_within_rule


def _grads(loss_fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    loss = loss_fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


@pytest.mark.skipif(peers.missing("trl-chunked") is not None, reason="TRL not importable")
def test_trl_chunked_peer_matches_the_naive_loss():
    case = bench_linear.make_case(64, 32, 700, torch.float32, "cpu")
    # multi-chunk on both axes: 700 entries over chunks of 256, rows over tiles of 16
    chunk, tokens = bench_linear.TRL_CHUNK, peers.trl_kernel("chunked_logprob").TOKEN_CHUNK_SIZE
    try:
        bench_linear.TRL_CHUNK = 256
        peers.trl_kernel("chunked_logprob").TOKEN_CHUNK_SIZE = 16
        trl = _grads(lambda x, w: bench_linear.loss("trl-chunked", x, w, case), *_xw(case))
    finally:
        bench_linear.TRL_CHUNK = chunk
        peers.trl_kernel("chunked_logprob").TOKEN_CHUNK_SIZE = tokens
    naive = _grads(lambda x, w: bench_linear.loss("naive", x, w, case), *_xw(case))
    c64 = bench_linear.Case(*(t.double() if t.is_floating_point() else t for t in _fields(case)))
    ref = _grads(lambda x, w: bench_linear.loss("naive", x, w, c64), *_xw(c64))
    for name, got, plain, want in zip(
        ("loss", "d hidden", "d weight"), (trl[0], *trl[1]), (naive[0], *naive[1]),
        (ref[0], *ref[1]), strict=True,
    ):  # fmt: skip
        assert_within_rule(name, got.double(), plain.double(), want, torch.float32)


def _xw(case):
    return case.hidden, case.weight


def _fields(case):
    return (case.hidden, case.weight, case.labels, case.old_logp, case.seq_adv, case.mask)


def test_unknown_peer_is_refused():
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        peers.missing("nope")


def test_absent_peer_is_named(monkeypatch):
    monkeypatch.setitem(peers._NEEDS, "trl-triton", ("trl.kernels.no_such_kernel",))
    assert "trl-triton is not importable here (trl.kernels.no_such_kernel" in peers.missing(
        "trl-triton"
    )
    assert bench_kernels.skip_reason("trl", "fwd", "cpu") == "trl: GPU stage only"


@pytest.mark.cuda
@pytest.mark.skipif(peers.missing("trl-triton") is not None, reason="TRL not importable")
def test_trl_triton_peer_matches_naive_on_gpu(cuda):
    case = bench_kernels.make_case(256, 32000, torch.bfloat16, "cuda")
    x = case.logits.float()
    trl = _grads(lambda t: bench_kernels.loss("trl", t, case), x)
    naive = _grads(lambda t: bench_kernels.loss("naive", t, case), x)
    ref = _grads(lambda t: bench_kernels.loss("naive", t, case), x.double())
    for name, got, plain, want in zip(
        ("loss", "d logits"), (trl[0], trl[1][0]), (naive[0], naive[1][0]), (ref[0], ref[1][0]),
        strict=True,
    ):  # fmt: skip
        assert_within_rule(name, got.double(), plain.double(), want, torch.float32)
