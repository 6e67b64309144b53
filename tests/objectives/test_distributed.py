"""entropy_aware_advantages / policy_loss with norm="batch" all-reduce their entropy statistics:
two gloo ranks holding half a batch each reproduce one process on the whole batch exactly."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from aepo.objectives import entropy_aware_advantages, policy_loss
from tests.helpers import assert_close_scaled, spawn_ranks

WORLD, B, T, COEF = 2, 6, 10, 0.2
LENGTHS = (10, 7, 4, 9, 2, 6)  # halves hold 18 and 14 masked tokens (position 0 is "prompt")


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).float()
    mask[:, 0] = 0
    adv = torch.randn(B, 1, generator=g) + 0.1 * torch.randn(B, T, generator=g)
    old_logp = -3 * torch.rand(B, T, generator=g)
    logp = old_logp + 0.7 * torch.randn(B, T, generator=g)  # ratios ~ 0.35 .. 3: clipped
    logp[2, 2], logp[4, 1] = old_logp[2, 2] + 1.5, old_logp[4, 1] + 1.5  # A < 0: dual clip
    entropy = 3 * torch.rand(B, T, generator=g)
    return {"adv": adv, "entropy": entropy, "mask": mask, "old_logp": old_logp, "logp": logp}


def _loss_and_grad(x: dict[str, torch.Tensor], group) -> tuple[torch.Tensor, torch.Tensor]:
    logp = x["logp"].clone().requires_grad_()
    loss, _ = policy_loss(
        logp,
        x["old_logp"],
        x["adv"],
        x["mask"],
        objective="aepo",
        entropy=x["entropy"],
        entropy_adv_coef=COEF,
        entropy_adv_norm="batch",
        clip_ratio_c=3.0,
        agg="token-mean",
        normalizer=_batch()["mask"].sum(),
        process_group=group,
    )
    loss.backward()
    return loss.detach(), logp.grad


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=WORLD,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=60),
    )
    try:
        n = B // WORLD
        x = {k: v[rank * n : (rank + 1) * n] for k, v in _batch().items()}
        args = (x["adv"], x["entropy"], x["mask"])
        out = {
            "batch": entropy_aware_advantages(*args, coef=COEF, process_group=dist.group.WORLD),
            "micro": entropy_aware_advantages(*args, coef=COEF, norm="micro"),
        }
        out["loss"], out["grad"] = _loss_and_grad(x, dist.group.WORLD)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("ranks"), timeout_s=120)


def test_batch_norm_matches_single_process(rank_results):
    x = _batch()
    full = entropy_aware_advantages(x["adv"], x["entropy"], x["mask"], coef=COEF, norm="batch")
    dist_batch = torch.cat([r["batch"] for r in rank_results])
    # the all-reduce sums the statistics in another order: 1e-6 of the largest advantage
    assert_close_scaled(dist_batch, full, 1e-6)
    # Local ("micro") statistics differ per half, so the check above can fail.
    micro = torch.cat([r["micro"] for r in rank_results])
    assert (micro - full).abs().max() > 1e-3


def test_policy_loss_gradients_match_single_process(rank_results):
    loss, grad = _loss_and_grad(_batch(), None)
    assert_close_scaled(torch.cat([r["grad"] for r in rank_results]), grad, 1e-6, msg="grad")
    # the loss sums per-token terms of size |A| with weights summing to 1: 1e-6 of max |A|
    loss_scale = _batch()["adv"].abs().max().item()
    ranks_loss = sum(r["loss"] for r in rank_results)
    assert_close_scaled(ranks_loss, loss, 1e-6, scale=loss_scale, msg="loss")
    # Without the all-reduce each half normalises by its own statistics: the gradients differ.
    halves = [{k: v[s] for k, v in _batch().items()} for s in (slice(0, 3), slice(3, 6))]
    local = torch.cat([_loss_and_grad(h, None)[1] for h in halves])
    assert (local - grad).abs().max() > 1e-3 * grad.abs().max()
