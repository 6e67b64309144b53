"""Preemption: SIGTERM / SIGINT (what schedulers and Ctrl-C send) ask the run to finish the
current step, checkpoint and exit 0; a second signal exits at once. Ranks agree through one
all-reduce per step, so a signal delivered to one rank's process stops them all at the same
step."""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from aepo.distributed import all_reduce

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Context manager installing the handlers (restored on exit).

    :meth:`requested` is a collective under torch.distributed: every rank calls it once per
    step; it returns the signal that stopped the run (on any rank), or None.
    """

    def __init__(self, signals=SIGNALS) -> None:
        self.signals, self.signum, self._previous = tuple(signals), 0, {}

    def __enter__(self) -> Preemption:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum:  # the second signal: no checkpoint, now
            print(f"aepo: second {name}: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"aepo: {name}: finishing the current step, then writing a checkpoint "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self) -> signal.Signals | None:
        flag = all_reduce(torch.tensor([float(self.signum)]), op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())) if flag.item() else None
