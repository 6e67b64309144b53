"""The trainer's side of the rollout: ``rollout.*`` keys reach the rollout, and its tool failure
counts become step metrics."""

from __future__ import annotations

import threading

from aepo.rollout.metrics import rollout_metrics
from aepo.rollout.tools.base import ToolOutput
from aepo.rollout.tree import TreeRollout
from aepo.train.config import load_config
from aepo.train.rollout import rollout_config
from tests.rollout.scripted import ScriptedEngine, WordTokenizer


def test_tool_timeouts_and_errors_become_step_metrics():
    cfg = load_config(None, ["rollout.tool_timeout_s=0.3", "rollout.mode=flat", "rollout.k=2"])
    config = rollout_config(cfg)
    assert config.tool_timeout_s == 0.3
    release = threading.Event()

    def hang(query):
        release.wait(60)  # far past the deadline; bounded so a regression fails
        return ToolOutput("late", ok=True)

    def boom(query):
        raise RuntimeError("down")

    tok = WordTokenizer()
    engine = ScriptedEngine(tok, n_calls=2, tags=("search", "python"))
    rollout = TreeRollout(engine, tok, {"search": hang, "python": boom}, config)
    try:
        out = rollout.run([tok.encode("question 0 ?"), tok.encode("question 1 ?")])
    finally:
        release.set()
    metrics = rollout_metrics(out)
    assert metrics["tool_timeouts"] == 4 and metrics["tool_errors"] == 4
    assert metrics["tool_calls_per_traj"] == 2
