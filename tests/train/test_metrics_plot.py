"""Metrics logging (JSON lines, TensorBoard, progress bar, resume truncation) and the plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from aepo.train.metrics import METRICS_FILE, MetricsLogger, format_compact, read_metrics
from aepo.train.plot import (
    dedupe_steps,
    main,
    plot_compare,
    plot_run,
    smooth,
    smoothing_window,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(line: str) -> dict:
    """json.loads that rejects the NaN / Infinity extensions Python would otherwise accept."""

    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def _raw_records(run_dir) -> list[dict]:
    return [_strict_json(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _step_metrics(step: int) -> dict[str, float]:
    """A plausible training step: every figure group but tool calls and branching has data."""
    metrics = {
        "reward_mean": 0.1 * step,
        "reward_std": 0.05,
        "entropy": 1.0 / (step + 1),
        "loss": -0.01 * step,
        "clip_frac_high": 0.02,
        "clip_frac_low": 0.01,
        "gen_tokens_per_s": float("nan"),  # all null: no throughput figure
        "time_rollout": 2.0,
        "time_train": 1.0,
        "time_sync": 0.25,
    }
    if step % 2 == 0:
        metrics["eval/em_1hop"] = 0.3 + 0.01 * step
    return metrics


def _log_steps(run_dir, steps, make=_step_metrics, **kwargs) -> None:
    kwargs = {"tensorboard": False, "progress": False, **kwargs}
    with MetricsLogger(run_dir, **kwargs) as logger:
        for step in steps:
            logger.log(step, make(step))


def test_log_writes_one_parseable_line_per_step(tmp_path):
    _log_steps(tmp_path, range(3), make=lambda s: {"reward_mean": 0.5 + s, "em": 0.25, "n": 7})
    expected = [{"step": s, "reward_mean": 0.5 + s, "em": 0.25, "n": 7} for s in range(3)]
    assert _raw_records(tmp_path) == expected
    assert read_metrics(tmp_path) == expected
    assert read_metrics(tmp_path / METRICS_FILE) == expected


def test_non_finite_and_non_numeric_values_become_null(tmp_path):
    metrics = {
        "nan": float("nan"),
        "inf": float("inf"),
        "neg_inf": -math.inf,
        "text": "abc",
        "none": None,
        "vector": torch.tensor([1.0, 2.0]),
        "np_float": np.float32(0.5),
        "np_int": np.int64(3),
        "tensor": torch.tensor(0.25),
        "tensor_nan": torch.tensor(float("nan")),
        "flag": True,
    }
    _log_steps(tmp_path, [0], make=lambda s: metrics)
    (record,) = _raw_records(tmp_path)
    assert record == {
        "step": 0,
        "nan": None,
        "inf": None,
        "neg_inf": None,
        "text": None,
        "none": None,
        "vector": None,
        "np_float": 0.5,
        "np_int": 3,
        "tensor": 0.25,
        "tensor_nan": None,
        "flag": 1,
    }


def test_other_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    _log_steps(run_dir, range(3), rank=1, tensorboard=True, progress=True)
    assert not run_dir.exists()


def test_log_after_close_raises(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False, progress=False)
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(0, {"loss": 1.0})


def test_resume_drops_later_steps_and_a_partial_line(tmp_path):
    _log_steps(tmp_path, range(6), make=lambda s: {"loss": float(s)})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "loss": 6.')  # killed mid-write
    with pytest.raises(ValueError):
        _raw_records(tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(6))

    _log_steps(tmp_path, [3, 4], start_step=3, make=lambda s: {"loss": 10.0 + s})
    assert _raw_records(tmp_path) == [
        {"step": 0, "loss": 0.0},
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 13.0},
        {"step": 4, "loss": 14.0},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temp file left


def test_fresh_start_replaces_an_old_run_and_its_partial_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    _log_steps(tmp_path, [0], make=lambda s: {"loss": 2.0})
    assert _raw_records(tmp_path) == [{"step": 0, "loss": 2.0}]


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = {"tensorboard": True}
    _log_steps(tmp_path, range(4), make=lambda s: {"loss": float(s), "bad": float("nan")}, **tb)
    _log_steps(tmp_path, [2, 3], start_step=2, make=lambda s: {"loss": 10.0 + s}, **tb)
    events = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "bad" not in acc.Tags()["scalars"]
    scalars = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert scalars == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]


def test_progress_bar_shows_key_numbers(tmp_path, capsys):
    _log_steps(
        tmp_path,
        [2, 3, 4],
        progress=True,
        total_steps=5,
        start_step=2,
        make=lambda s: {"reward_mean": 0.123456, "loss": float("nan"), "em": 1.0},
    )
    err = capsys.readouterr().err
    assert "5/5" in err
    assert "reward_mean=0.1235" in err
    assert "loss=nan" in err
    assert "em=" not in err  # not a bar key


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "nan"), (3, "3"), (0.123456, "0.1235"), (12345.678, "1.235e+04"), (-2.5, "-2.5")],
    ids=["null", "int", "small", "large", "negative"],
)
def test_format_compact(value, text):
    assert format_compact(value) == text


def test_dedupe_steps_sorts_and_keeps_the_last_record():
    records = [{"step": 1, "x": 1}, {"step": 0, "x": 0}, {"step": 1, "x": 2}]
    assert dedupe_steps(records) == [{"step": 0, "x": 0}, {"step": 1, "x": 2}]


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 2000, path


def test_plot_run_writes_present_groups_only(tmp_path):
    _log_steps(tmp_path, range(8))
    paths = plot_run(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "reward.png",
            "entropy.png",
            "clip_frac.png",
            "loss.png",
            "timing.png",
            "eval.png",
            "overview.png",
        ]
    )
    for path in paths:
        assert path.parent == tmp_path / "plots"
        _assert_png(path)
    # Absent (tool calls, branching, accuracy) and all-null (throughput) groups get no figure.
    on_disk = {p.name for p in (tmp_path / "plots").iterdir()}
    assert on_disk == set(names)


def test_plot_run_adds_a_per_group_exact_match_panel(tmp_path):
    _log_steps(tmp_path, range(4), make=lambda s: {"em": 0.5, "em_1hop": 0.9, "em_2hop": 0.1 * s})
    names = [p.name for p in plot_run(tmp_path)]
    assert "em_groups.png" in names and "accuracy.png" in names
    _log_steps(tmp_path / "none", range(4), make=lambda s: {"em": 0.5, "em_2hop": None})
    assert "em_groups.png" not in [p.name for p in plot_run(tmp_path / "none")]


def test_plot_run_overview_falls_back_to_minor_groups(tmp_path):
    _log_steps(tmp_path, range(3), make=lambda s: {"loss": float(s)})
    paths = plot_run(tmp_path, tmp_path / "out")
    assert [p.name for p in paths] == ["loss.png", "overview.png"]
    for path in paths:
        _assert_png(path)


def test_plot_run_without_records_writes_nothing(tmp_path):
    (tmp_path / METRICS_FILE).write_text("")
    assert plot_run(tmp_path) == []
    assert not (tmp_path / "plots").exists()


def test_plot_compare_overlays_runs(tmp_path):
    for mode, scale in [("flat", 1.0), ("aepo", 2.0)]:
        _log_steps(
            tmp_path / mode,
            range(5),
            make=lambda s, k=scale: {"reward_mean": k * s, "entropy": 1.0, "branches_per_group": 2},
        )
    out = plot_compare({m: tmp_path / m for m in ("flat", "aepo")}, tmp_path / "cmp" / "c.png")
    assert out == tmp_path / "cmp" / "c.png"
    _assert_png(out)
    with pytest.raises(ValueError, match="none of the runs"):
        plot_compare({"flat": tmp_path / "flat"}, tmp_path / "x.png", keys=("absent",))


@pytest.mark.parametrize("window", [1, 3, 7, 50])
def test_smooth_is_a_trailing_mean(window):
    values = np.random.default_rng(window).normal(size=40)
    expected = [values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))]
    np.testing.assert_allclose(smooth(list(values), window), expected, rtol=1e-12, atol=1e-12)


def test_smoothing_window_only_for_long_curves():
    assert smoothing_window(30) == 1 and smoothing_window(120) == 10
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


def test_plot_compare_long_runs(tmp_path):
    _log_steps(tmp_path / "a", range(120), make=lambda s: {"reward_mean": (s % 7) / 7})
    _assert_png(plot_compare({"a": tmp_path / "a"}, tmp_path / "c.png"))


def test_main_plots_a_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _log_steps(run_dir, range(4), make=lambda s: {"reward_mean": float(s), "entropy": 1.0})
    assert main([str(run_dir), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed and all(p.startswith(str(tmp_path / "figs")) for p in printed)
    assert sorted(printed) == sorted(
        str(tmp_path / "figs" / name) for name in ("reward.png", "entropy.png", "overview.png")
    )
    for path in printed:
        _assert_png(tmp_path / "figs" / path.rsplit("/", 1)[-1])


def test_main_reports_a_missing_run(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "aepo plot:" in capsys.readouterr().err
