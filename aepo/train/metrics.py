"""Per-step training metrics, written by rank 0 only: one fsync'd JSON line per step in
``run_dir/metrics.jsonl``, TensorBoard scalars in ``run_dir/tb`` and a tqdm progress bar.

A run resumed at step N > 0 owns every step >= N: lines a killed run wrote after its last
checkpoint are dropped, atomically, before the resumed run appends the same steps again.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
DEFAULT_BAR_KEYS = ("reward_mean", "entropy", "loss", "gen_tokens_per_s")


def clean_value(value: Any) -> float | int | None:
    """A JSON-safe number: ints stay ints, finite reals (numpy, 0-d tensors) become floats,
    anything non-finite or non-numeric (strings, None, multi-element tensors) becomes None."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _parse_line(line: str) -> dict[str, Any] | None:
    """One metrics record, or None for a partial or corrupt line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def _metrics_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/metrics.jsonl``, or ``run_dir`` itself when it names the file."""
    path = Path(run_dir)
    return path if path.is_file() else path / METRICS_FILE


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a run in file order; a corrupt (half-written) line is skipped.

    Raises FileNotFoundError when the run has no metrics file.
    """
    with _metrics_path(run_dir).open(encoding="utf-8", errors="replace") as f:
        records = (_parse_line(line) for line in f if line.strip())
        return [r for r in records if r is not None]


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every OS can open a dir)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def truncate_metrics(path: Path, before_step: int | None) -> None:
    """Rewrite ``path`` atomically keeping its valid lines with step < ``before_step`` (all valid
    lines when None). Corrupt lines, such as a half-written last one, are dropped. A no-op when
    the file is missing or nothing would change."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    kept = []
    for line in lines:
        record = _parse_line(line)
        if record is not None and (before_step is None or record["step"] < before_step):
            kept.append(line.strip() + "\n")
    if not text or (len(kept) == len(lines) and text.endswith("\n")):
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def format_compact(value: float | int | None) -> str:
    """A short number for the progress bar: 4 significant digits, ``nan`` for a missing value."""
    if value is None:
        return "nan"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


class MetricsLogger:
    """Logs one dict of scalars per training step. Only rank 0 writes; on other ranks every
    method is a no-op, so the training loop calls it unconditionally.

    ``start_step`` is the first step this run will log (0 for a fresh run, the checkpoint's step
    for a resume); lines at or after it left by a killed run are dropped at construction.
    Steps are 0-indexed: after logging step s, s + 1 steps are done.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        rank: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        total_steps: int | None = None,
        start_step: int = 0,
        keys_in_bar: Sequence[str] = DEFAULT_BAR_KEYS,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.keys_in_bar = tuple(keys_in_bar)
        self._file = None
        self._writer = None
        self._bar = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        truncate_metrics(path, start_step)  # a fresh run (0) starts an empty file
        self._file = path.open("a", encoding="utf-8")
        if tensorboard:
            self._writer = _summary_writer(self.run_dir / TB_DIR, start_step)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    @property
    def path(self) -> Path:
        """The metrics file."""
        return self.run_dir / METRICS_FILE

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` (fsync'd), add TensorBoard scalars and advance
        the progress bar. Non-finite or non-numeric values are written as null."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        step = int(step)
        record: dict[str, Any] = {"step": step}
        record.update((str(k), clean_value(v)) for k, v in metrics.items() if k != "step")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._writer is not None:
            self._write_scalars(step, record)
        if self._bar is not None:
            self._advance_bar(step, record)

    def _write_scalars(self, step: int, record: Mapping[str, Any]) -> None:
        """TensorBoard scalars for the record's present values."""
        for key, value in record.items():
            if key != "step" and value is not None:
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def _advance_bar(self, step: int, record: Mapping[str, Any]) -> None:
        """Move the bar to step + 1 done and show the key numbers."""
        shown = {k: format_compact(record[k]) for k in self.keys_in_bar if k in record}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(max(0, step + 1 - self._bar.n))

    def close(self) -> None:
        """Flush and close the file, TensorBoard writer and bar; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _summary_writer(log_dir: Path, start_step: int) -> Any:
    """A TensorBoard SummaryWriter that purges events at >= ``start_step`` on resume, or None
    (with a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        warnings.warn(f"TensorBoard logging disabled: {e}", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step if start_step > 0 else None)
