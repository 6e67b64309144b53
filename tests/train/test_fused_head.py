"""The trainer's fused hidden-state loss (objective.lm_head=fused) against its logits path on 2
gloo ranks: the same old log-probs and entropy, the same loss, the same gradients, and after one
optimizer step the same parameters, for a tied and an untied model at ZeRO stages 0 and 3
(under ZeRO-3 the lm_head weight is gathered for the kernel, forward and backward, and its
gradient reaches the partitioned parameter like the model's own lm_head's would)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aepo.lm_head import fused_head_blocker
from aepo.models import build_model, save, train_tokenizer
from tests.helpers import EPS32, assert_close_scaled, torchrun

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("fused_head_worker.py")
TEXTS = [f"the {a} of {b} is {c}" for a in "xyz" for b in "abc" for c in ("p", "q", "r s")]


# A freshly initialised model's next-token distributions are near-uniform: entropy std ~1e-3,
# and the entropy-aware advantage divides by it, turning fp32 rounding of the entropy into
# 1e-4 relative differences in the loss. Scaling the final norm spreads the entropies like a
# trained model's (mean ~4.5, std ~0.3-0.7 nats), where fp32 equivalence is meaningful.
NORM_SCALE = {False: 10.0, True: 5.0}
# Adam's first step is -lr g / (|g| + eps): near |g| ~ eps its derivative lr eps / (|g| + eps)^2
# turns a rounding difference in g into up to ~lr in the parameter. The gradients are compared
# everywhere (rtol 1e-5 of the tensor's largest); the parameters after the step wherever that
# gradient tolerance, propagated through the step, stays within atol (and exactly-zero
# gradients, which move nothing), and bounded by 2 lr elsewhere. The worker turns clipping
# off, which would scale small gradients down towards eps.
LR, ADAM_EPS, RTOL, ATOL = 0.01, 1e-8, 1e-5, 1e-6


def adam_ill_conditioned(grad: torch.Tensor) -> torch.Tensor:
    """Elements whose first Adam step can move by more than ATOL under a gradient difference of
    RTOL x max|grad|."""
    delta = RTOL * grad.abs().max()
    return (grad != 0) & ((grad.abs() + ADAM_EPS) ** 2 < LR * ADAM_EPS * delta / ATOL)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[bool, Path]:
    tok = train_tokenizer(TEXTS * 4, vocab_size=300)
    root = tmp_path_factory.mktemp("models")
    out = {}
    for tied in (False, True):
        model = build_model(tok, hidden=64, layers=2, heads=2, tie_embeddings=tied)
        with torch.no_grad():
            model.model.norm.weight.mul_(NORM_SCALE[tied])
        out[tied] = save(model, tok, root / f"tied{int(tied)}")
    return out


def _run(model: Path, stage: int, out: Path) -> dict:
    proc = torchrun(WORKER, model, stage, out)
    assert "objective.lm_head=fused: policy loss from hidden states" in proc.stdout
    return torch.load(out)


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_head_equals_logits_path(models, tmp_path, stage, tied):
    got = _run(models[tied], stage, tmp_path / "out.pt")
    logits, fused = got["logits"], got["fused"]
    assert fused["fused"] and not logits["fused"]
    assert_close_scaled(fused["entropy"], logits["entropy"], RTOL, msg="entropy")
    for key in ("loss", "clip_frac_high", "clip_frac_low"):
        # the loss sums terms of size |A| ~ 1, the clip fractions are <= 1: 4 ulps at 1 as floor
        want = logits["metrics"][key]
        assert fused["metrics"][key] == pytest.approx(want, rel=RTOL, abs=4 * EPS32), key
    names = set(logits["params"])
    assert (names == set(fused["params"]) and "lm_head.weight" in names) or tied
    assert set(fused["grads"]) == set(logits["grads"]) and len(logits["grads"]) >= len(names)
    for name in sorted(logits["grads"]):
        assert_close_scaled(fused["grads"][name], logits["grads"][name], RTOL, msg=f"grad {name}")
    close = {"rtol": RTOL, "atol": ATOL}
    for name in sorted(names):
        grad = logits["grads"].get(name, logits["grads"].get("model.embed_tokens.weight"))
        ill = adam_ill_conditioned(grad)
        assert ill.float().mean() < 0.01, name
        got, want = fused["params"][name], logits["params"][name]
        torch.testing.assert_close(
            got[~ill], want[~ill], **close, msg=lambda m, n=name: f"{n}: {m}"
        )
        assert (got - want).abs().max() <= 2 * LR  # each first Adam step moves at most lr


def test_auto_refuses_a_biased_head():
    model = build_model(train_tokenizer(TEXTS, vocab_size=300), hidden=64, heads=2)
    assert fused_head_blocker(model) is None
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    assert fused_head_blocker(model) == "the lm_head has a bias"
    model.config.final_logit_softcapping = 30.0
    model.lm_head.bias = None
    assert "final_logit_softcapping=30.0" in fused_head_blocker(model)
