"""The signal handlers for real: the first SIGTERM only sets the stop request (the process
goes on), the second exits at once with 128 + signum; handlers are restored on exit."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, time
    from aepo.train.preempt import Preemption

    with Preemption() as p:
        assert p.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested() == signal.SIGTERM, p.requested()
        print("still running after the first signal", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    print("not reached", flush=True)
    """
)


def test_first_signal_requests_a_stop_second_exits_at_once():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=25
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "still running after the first signal" in proc.stdout
    assert "not reached" not in proc.stdout
    assert "SIGTERM: finishing the current step" in proc.stderr
    assert "second SIGINT: exiting at once" in proc.stderr


def test_handlers_are_restored():
    from aepo.train.preempt import Preemption

    before = signal.getsignal(signal.SIGTERM)
    with Preemption():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
