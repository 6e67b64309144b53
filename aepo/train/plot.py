"""Training curves from a run's ``metrics.jsonl``: one PNG per metric group plus an overview grid
(``aepo plot RUN_DIR``), and an overlay of several runs for comparing flat / arpo / aepo.

matplotlib is imported only when a figure is drawn, and drawn on an Agg canvas (no pyplot, no
display, no global figure state).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aepo.train.metrics import read_metrics

EVAL_PREFIX = "eval/"
GROUP_PREFIX = "em_"
DEFAULT_COMPARE_KEYS = ("reward_mean", "entropy", "tool_calls_per_traj", "distinct_per_group")


@dataclass(frozen=True)
class Panel:
    """One group of curves: a PNG of its own and a cell of the overview."""

    name: str  # file stem: <name>.png
    title: str
    ylabel: str
    keys: tuple[str, ...]  # the figure is skipped when every key is absent
    style: str = "lines"  # "lines", "band" (keys[0] +- keys[1]) or "stack" (stacked areas)


PANELS = (
    Panel("reward", "Reward", "reward", ("reward_mean", "reward_std"), "band"),
    Panel("accuracy", "Answer accuracy", "fraction", ("em", "f1", "format_ok")),
    Panel("entropy", "Policy entropy", "entropy (nats / token)", ("entropy",)),
    Panel("clip_frac", "Clipped token fraction", "fraction", ("clip_frac_high", "clip_frac_low")),
    Panel("loss", "Policy loss", "loss", ("loss",)),
    Panel("tool_calls", "Tool calls per trajectory", "calls", ("tool_calls_per_traj",)),
    Panel("branches", "Branching per group", "count", ("branches_per_group", "distinct_per_group")),
    Panel("throughput", "Generation throughput", "tokens / s", ("gen_tokens_per_s",)),
    Panel(
        "timing", "Time per step", "seconds", ("time_rollout", "time_train", "time_sync"), "stack"
    ),
)
OVERVIEW = (
    "reward",
    "em_groups",
    "entropy",
    "clip_frac",
    "tool_calls",
    "branches",
    "throughput",
    "timing",
    "eval",
)
TITLES = {key: p.title for p in PANELS for key in p.keys if len(p.keys) == 1}
TITLES.update(reward_mean="Mean reward", distinct_per_group="Distinct per group")


def dedupe_steps(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records sorted by step, the last record of a repeated step winning."""
    by_step = {int(r["step"]): r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the rows where it is present and not null."""
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in pairs], [float(v) for _, v in pairs]


def _has(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def present_panels(rows: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """The panels with data, plus one for per-group exact match (``em_<group>``, from a task's
    ``metric_group``) and one for all eval/* metrics when there are any."""
    panels = [p for p in PANELS if any(_has(rows, k) for k in _required(p))]
    names = sorted({k for r in rows for k in r})
    group_keys = tuple(k for k in names if k.startswith(GROUP_PREFIX) and _has(rows, k))
    if group_keys:
        panels.append(Panel("em_groups", "Training exact match by group", "fraction", group_keys))
    eval_keys = tuple(k for k in names if k.startswith(EVAL_PREFIX) and _has(rows, k))
    if eval_keys:
        panels.append(Panel("eval", "Evaluation", "score", eval_keys))
    return panels


def _required(panel: Panel) -> tuple[str, ...]:
    """Keys whose presence makes the panel worth drawing (a band needs its centre line)."""
    return panel.keys[:1] if panel.style == "band" else panel.keys


def _new_figure(n: int, ncols: int, cell: tuple[float, float] = (6.4, 4.0)) -> tuple[Any, list]:
    """A constrained-layout figure on an Agg canvas with n axes in a grid; spare cells hidden."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(cell[0] * ncols, cell[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _decorate(ax: Any, title: str, ylabel: str) -> None:
    """Title, axis labels, grid, and a legend when the axes hold more than one curve."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 1:
        ax.legend(fontsize="small")


def _marker(n_points: int) -> str | None:
    """Dots for sparse curves (eval every k steps, short runs), plain lines otherwise."""
    return "o" if n_points <= 30 else None


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: element i is the mean of values[max(0, i-window+1) : i+1]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def smoothing_window(n_points: int) -> int:
    """About a twelfth of the run, so per-step noise averages out but trends stay visible."""
    return max(1, n_points // 12) if n_points > 30 else 1


def _plot_curve(ax: Any, steps: list[int], values: list[float], **style: Any) -> None:
    """Short curves as dots; long ones as a faint raw line under a trailing moving average."""
    window = smoothing_window(len(steps))
    if window == 1:
        ax.plot(steps, values, marker=_marker(len(steps)), markersize=3, **style)
        return
    label = style.pop("label", None)
    (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
    style.setdefault("color", raw.get_color())
    label = None if label is None else f"{label} (avg {window})"
    ax.plot(steps, smooth(values, window), label=label, **style)


def _draw_lines(ax: Any, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    for key in keys:
        steps, values = series(rows, key)
        if steps:
            _plot_curve(ax, steps, values, label=key)


def _draw_band(ax: Any, rows: Sequence[Mapping[str, Any]], mean_key: str, std_key: str) -> None:
    """The mean as a line, mean +- std shaded where both are present."""
    _draw_lines(ax, rows, [mean_key])
    both = [r for r in rows if r.get(mean_key) is not None and r.get(std_key) is not None]
    if both:
        steps = [r["step"] for r in both]
        low = [r[mean_key] - r[std_key] for r in both]
        high = [r[mean_key] + r[std_key] for r in both]
        ax.fill_between(steps, low, high, alpha=0.25, label=f"± {std_key}")


def _draw_stack(ax: Any, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """Stacked areas over the steps where any key is present; a missing part counts as 0."""
    keys = [k for k in keys if _has(rows, k)]
    rows = [r for r in rows if any(r.get(k) is not None for k in keys)]
    steps = [r["step"] for r in rows]
    parts = [[r.get(k) or 0.0 for r in rows] for k in keys]
    ax.stackplot(steps, *parts, labels=keys, alpha=0.8)


def draw_panel(ax: Any, panel: Panel, rows: Sequence[Mapping[str, Any]]) -> None:
    """Draw one panel's curves into ``ax``."""
    if panel.style == "band":
        _draw_band(ax, rows, *panel.keys)
    elif panel.style == "stack":
        _draw_stack(ax, rows, panel.keys)
    else:
        _draw_lines(ax, rows, panel.keys)
    _decorate(ax, panel.title, panel.ylabel)


def plot_run(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write ``<group>.png`` for every metric group with data, and ``overview.png``, into
    ``out_dir`` (default ``run_dir/plots``). Returns the written paths (empty when the run has
    no records); raises FileNotFoundError when it has no metrics file."""
    rows = dedupe_steps(read_metrics(run_dir))
    panels = present_panels(rows)
    if not panels:
        return []
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        fig, (ax,) = _new_figure(1, 1)
        draw_panel(ax, panel, rows)
        written.append(_save(fig, out / f"{panel.name}.png"))
    main_panels = [p for p in panels if p.name in OVERVIEW] or panels
    fig, axes = _new_figure(len(main_panels), min(3, len(main_panels)), cell=(5.0, 3.4))
    for ax, panel in zip(axes, main_panels, strict=True):
        draw_panel(ax, panel, rows)
    fig.suptitle(Path(run_dir).name)
    written.append(_save(fig, out / "overview.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def plot_compare(
    runs: Mapping[str, Path | str],
    out_path: str | os.PathLike[str],
    keys: Sequence[str] = DEFAULT_COMPARE_KEYS,
) -> Path:
    """Overlay several runs (label -> run dir), one panel per key present in any of them; a run
    keeps its colour across panels. Raises ValueError when no run has any of the keys."""
    tables = {label: dedupe_steps(read_metrics(d)) for label, d in runs.items()}
    present = [k for k in keys if any(_has(rows, k) for rows in tables.values())]
    if not present:
        raise ValueError(f"none of the runs {list(runs)} has any of the keys {list(keys)}")
    fig, axes = _new_figure(len(present), min(2, len(present)))
    for ax, key in zip(axes, present, strict=True):
        for i, (label, rows) in enumerate(tables.items()):
            steps, values = series(rows, key)
            if steps:
                _plot_curve(ax, steps, values, label=label, color=f"C{i}")
        _decorate(ax, TITLES.get(key, key), key)
        ax.legend(fontsize="small")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    """``aepo plot RUN_DIR [--out DIR]``: curves of one run; with several run dirs, one overlay
    ``compare.png``. Prints the written paths; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="aepo plot", description="Plot training curves from RUN_DIR/metrics.jsonl."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: RUN_DIR/plots; with several runs: the current dir)",
    )
    args = parser.parse_args(argv)
    try:
        if len(args.run_dirs) == 1:
            paths = plot_run(args.run_dirs[0], args.out)
        else:
            runs = {str(d): d for d in args.run_dirs}
            paths = [plot_compare(runs, (args.out or Path()) / "compare.png")]
    except (FileNotFoundError, ValueError) as e:
        print(f"aepo plot: {e}", file=sys.stderr)
        return 1
    if not paths:
        print(f"aepo plot: no metrics in {args.run_dirs[0]}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
