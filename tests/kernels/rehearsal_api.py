"""Device placement of the public loss APIs, rehearsed on the CPU (tests/nominal_device.py);
run in its own process by tests/kernels/test_device_rehearsal.py.

The model's outputs (logits, hidden states, the lm_head weight) and the labels are on the GPU;
what a caller naturally builds on the host stays there: old log-probs and advantages from the
rollout, the mask, entropy statistics from host copies of the entropies, group ids, the
normaliser. Before the fix the default fused head indexed host statistics with a GPU index and
``entropy_adv_norm=group`` ran ``index_add_`` with a host index (GPU_AUDIT 1.1 and 1.4)."""

from __future__ import annotations

import pytest
import torch

from aepo.kernels import fused_linear_policy_loss, fused_policy_loss
from aepo.objectives import entropy_statistics, policy_loss
from tests.nominal_device import Nominal, host, on_gpu, to_gpu

B, L, H, V = 3, 6, 8, 40


def _batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, L)
    mask[1, 4:] = 0
    return {
        "hidden": torch.randn(B, L, H, generator=g),
        "weight": torch.randn(V, H, generator=g) * 0.5,
        "labels": torch.randint(0, V, (B, L), generator=g),
        "old": -3 * torch.rand(B, L, generator=g),
        "adv": torch.randn(B, 1, generator=g).expand(B, L),
        "mask": mask,
        "entropy": 3 * torch.rand(B, L, generator=g),
        "groups": torch.tensor([4, 4, 9]),
    }


def _loss(head: str, norm: str, stats: bool, x: dict, hidden, weight, labels):
    """The loss and (d hidden, d weight) of one API call on these inputs."""
    kw = {"entropy_adv_norm": norm, "normalizer": x["mask"].sum(), "backend": "torch"}
    kw |= {"entropy_coef": 0.01, "ref_logp": x["old"] + 0.1, "kl_coef": 0.05}
    if norm == "group":
        kw["group_ids"] = x["groups"]
    if stats:
        kw["entropy_stats"] = entropy_statistics(
            x["entropy"], x["mask"], norm=norm, group_ids=x["groups"]
        )
    tokens = (labels, x["old"], x["adv"], x["mask"])
    if head == "linear":
        loss, metrics = fused_linear_policy_loss(hidden, weight, *tokens, **kw)
    else:
        loss, metrics = fused_policy_loss(hidden @ weight.T, *tokens, **kw)
    return loss, metrics, torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("head", ["linear", "logits"])
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("stats", [True, False], ids=["stats", "no-stats"])
def test_loss_apis_take_host_inputs_with_gpu_activations(head, norm, stats):
    x = _batch()
    leaves = lambda: (x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_())
    want = _loss(head, norm, stats, x, *leaves(), x["labels"])
    with on_gpu() as gpu:
        hidden, weight = to_gpu(leaves())
        loss, metrics, grads = _loss(head, norm, stats, x, hidden, weight, x["labels"].to(gpu))
    assert loss.device == gpu and all(g.device == gpu for g in grads)
    assert all(m.device == gpu for m in metrics.values())
    # the same CPU arithmetic either way: bitwise equal
    assert torch.equal(host(loss), want[0])
    for got, ref in zip(grads, want[2], strict=True):
        assert torch.equal(host(got), ref)


def test_policy_loss_moves_host_inputs_to_the_log_probs_device():
    x = _batch()
    stats = entropy_statistics(x["entropy"], x["mask"], norm="group", group_ids=x["groups"])
    with on_gpu():
        logp, entropy = to_gpu((x["old"] + 0.2, x["entropy"]))
        loss, _ = policy_loss(
            logp.requires_grad_(),
            x["old"],
            x["adv"],
            x["mask"],
            entropy=entropy,
            entropy_adv_norm="group",
            group_ids=x["groups"],
            entropy_stats=stats,
        )
    assert isinstance(loss, Nominal)


# -- the rehearsal itself: it must raise where CUDA raises, and only there ---------------------


def test_rehearsal_raises_where_cuda_does():
    with on_gpu() as gpu:
        x = torch.randn(4, 3, device=gpu)
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3)  # a host tensor of one dimension
        with pytest.raises(RuntimeError, match="same device"):
            x.index_select(0, torch.tensor([0, 2]))  # a host index
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(4, device=gpu).index_add_(0, torch.tensor([0, 1]), torch.ones(2))
        assert (x * torch.tensor(2.0)).device == gpu  # a 0-dim host tensor is a scalar
        assert x[torch.tensor([0, 2])].device == gpu  # advanced indexing copies host indices
        assert x.cpu().device.type == "cpu" and not isinstance(x.cpu(), Nominal)
        assert torch.as_tensor(1.5, device=gpu).device == gpu


def test_rehearsal_carries_autograd_and_optimizers():
    with on_gpu() as gpu:
        layer = torch.nn.Linear(3, 2).to(gpu)
        layer(torch.randn(5, 3, device=gpu)).square().sum().backward()
        assert layer.weight.grad.device == gpu
        before = host(layer.weight).clone()
        torch.optim.AdamW(layer.parameters(), lr=0.1).step()
    assert not torch.equal(host(layer.weight), before)
