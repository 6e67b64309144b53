"""Benchmark rows as JSON lines, each written and flushed to disk the moment it is measured.

A run killed at any point (a time limit, an out-of-memory kill) leaves every finished row
readable; a line cut off mid-write is skipped when reading, never fatal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def append(path: Path | str, row: dict) -> None:
    """Append one row to the JSON-lines file ``path`` and force it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path | str) -> list[dict]:
    """Every complete row of ``path`` (none if it does not exist), in the order written."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run
            continue
    return out
