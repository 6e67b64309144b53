"""Per-group training exact match: sums and counts per rank, divided after the rank mean."""

from __future__ import annotations

import math

from aepo.train.loop import finish_group_means, group_sums


def test_group_sums_cover_every_task_group():
    out = group_sums([1.0, 0.0, 1.0, 1.0], [1, 2, 2, 1], groups=[1, 2, 3], group_key="hops")
    assert out == {
        "_sum/em_1hop": 2.0,
        "_count/em_1hop": 2.0,
        "_sum/em_2hop": 1.0,
        "_count/em_2hop": 2.0,
        "_sum/em_3hop": 0.0,
        "_count/em_3hop": 0.0,
    }


def test_finish_after_a_rank_mean_gives_the_pooled_ratio():
    # Rank 0: 1-hop 3/4, no 2-hop; rank 1: 1-hop 0/1, 2-hop 1/3. Pooled: 3/5 and 1/3.
    ranks = [
        group_sums([1, 1, 1, 0], [1, 1, 1, 1], [1, 2], "hops") | {"em": 0.75},
        group_sums([0, 1, 0, 0], [1, 2, 2, 2], [1, 2], "hops") | {"em": 0.25},
    ]
    mean = {k: sum(r[k] for r in ranks) / 2 for k in ranks[0]}  # what mean_over_ranks does
    out = finish_group_means(mean)
    assert set(out) == {"em", "em_1hop", "em_2hop"}
    assert math.isclose(out["em_1hop"], 3 / 5) and math.isclose(out["em_2hop"], 1 / 3)
    assert out["em"] == 0.5


def test_empty_group_is_nan_and_other_fields_are_labelled():
    out = finish_group_means(group_sums([1.0], ["a"], ["a", "b"], group_key="kind"))
    assert out["em_kind=a"] == 1.0 and math.isnan(out["em_kind=b"])
