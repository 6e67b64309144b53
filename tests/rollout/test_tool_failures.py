"""Tools that hang, raise or return the wrong thing: the rollout inserts an ``ok=False`` result
(mask 0), counts it, and goes on within a bounded time; other tools and paths are unaffected."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aepo.rollout.branching import BranchConfig
from aepo.rollout.tools.base import ToolOutput
from aepo.rollout.tools.runner import ToolRunner
from aepo.rollout.tree import RolloutConfig, TreeRollout
from tests.rollout.scripted import EchoSearch, ScriptedEngine, WordTokenizer

TIMEOUT = 0.5
HANG_S = 60.0  # a hung call outlives any test; bounded so a regression fails instead of hanging
ROOT = Path(__file__).resolve().parents[2]


class Hang:
    """Blocks until ``release`` is set (never, while a test runs) or HANG_S, then answers."""

    name = "search"

    def __init__(self):
        self.release, self.queries = threading.Event(), []

    def __call__(self, query: str) -> ToolOutput:
        self.queries.append(query)
        self.release.wait(HANG_S)
        return ToolOutput(f"late {query}", ok=True)


class Echo:
    name = "python"

    def __call__(self, query: str) -> ToolOutput:
        return ToolOutput(f"ran {query}", ok=True)


@pytest.fixture
def hang():
    tool = Hang()
    yield tool
    tool.release.set()  # lets the abandoned threads end


def _run(tools, prompts: int = 2, k: int = 2, **config):
    """Each path calls search, then python, then answers; returns (output, wall seconds)."""
    tok = WordTokenizer()
    engine = ScriptedEngine(tok, n_calls=2, tags=("search", "python"))
    cfg = RolloutConfig(branch=BranchConfig(mode="flat", k=k), tool_timeout_s=TIMEOUT, **config)
    rollout = TreeRollout(engine, tok, tools, cfg)
    t0 = time.perf_counter()
    out = rollout.run([tok.encode(f"question {i} ?") for i in range(prompts)])
    return out, time.perf_counter() - t0, rollout


def _check_calls(out, search_error: str, search_text: str) -> None:
    """Every path: the search call failed with ``search_error`` and a text that starts with
    ``search_text``; the python call after it ran fine; both results sit at mask 0."""
    assert len(out.trajectories) == 4
    for t in out.trajectories:
        assert t.finish_reason == "answer"
        search, python = t.tool_calls
        assert (search.tool, search.ok, search.error) == ("search", False, search_error)
        assert search.text.startswith(search_text)
        assert (python.tool, python.ok, python.text) == ("python", True, f"ran {python.query}")
        for c in t.tool_calls:
            assert c.end > c.start and t.loss_mask[c.start : c.end] == [0] * (c.end - c.start)
            assert t.logprobs[c.start : c.end] == [0.0] * (c.end - c.start)


def test_a_hung_tool_times_out_and_the_rollout_goes_on(hang):
    out, wall, rollout = _run({"search": hang, "python": Echo()})
    assert wall < TIMEOUT + 5
    _check_calls(out, "timeout", f"Error: tool 'search' timed out after {TIMEOUT:g} s")
    assert all(t.tool_calls[0].text.endswith(" s") for t in out.trajectories)
    assert all(t.tool_calls[0].elapsed_s == TIMEOUT for t in out.trajectories)
    assert out.stats["tool_timeouts"] == 4 and out.stats["tool_errors"] == 0
    assert out.stats["tool_calls"] == 8 and len(hang.queries) == 4
    assert rollout.runner.hung("search") == 4  # run returned without waiting for them


def _raise(exc):
    def tool(query):
        raise exc

    return tool


BAD_TOOLS = {
    "raises": (_raise(ValueError("boom")), "exception", "raised ValueError: boom"),
    "exits": (_raise(SystemExit(3)), "exception", "raised SystemExit: 3"),
    "returns-str": (lambda q: "plain", "bad return", "returned str, not"),
    "returns-None": (lambda q: None, "bad return", "returned NoneType, not"),
    "text-None": (
        lambda q: ToolOutput(None, ok=True),  # type: ignore[arg-type]
        "bad return",
        "returned a ToolOutput whose text is NoneType, not",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_a_failing_tool_gives_an_error_result(case):
    fn, error, words = BAD_TOOLS[case]
    out, wall, _ = _run({"search": fn, "python": Echo()})
    assert wall < 5
    _check_calls(out, error, f"Error: tool 'search' {words}")
    assert out.stats["tool_errors"] == 4 and out.stats["tool_timeouts"] == 0


def test_a_missing_tool_is_an_error_and_others_still_run():
    out, _, _ = _run({"search": EchoSearch()})
    for t in out.trajectories:
        search, python = t.tool_calls
        assert search.ok and search.text == f"found {search.query}"
        assert (python.ok, python.error) == (False, "unknown tool")
        assert python.text == "Error: no tool named 'python'"
    assert out.stats["tool_errors"] == 4 and out.stats["tool_timeouts"] == 0


def test_the_deadline_counts_from_each_call_start(hang):
    runner = ToolRunner({"search": hang, "python": Echo()}, workers=1, timeout_s=0.2)
    t0 = time.perf_counter()
    outs = runner.map([("search", "a"), ("search", "b"), ("python", "c")])
    wall = time.perf_counter() - t0
    assert [o.error for o in outs] == ["timeout", "timeout", None]
    assert outs[2].text == "ran c" and hang.queries == ["a", "b"]
    assert 0.4 <= wall < 0.4 + 3  # the second call got its own 0.2 s once a worker was free


def test_hung_calls_are_capped_per_tool_and_the_tool_recovers(hang):
    runner = ToolRunner({"search": hang, "python": Echo()}, workers=4, timeout_s=0.2, max_hung=2)
    assert [o.error for o in runner.map([("search", "a")] * 3)] == ["timeout"] * 3
    assert runner.hung("search") == 3  # a batch can overshoot the cap by workers - 1
    skipped, ran = runner.map([("search", "b"), ("python", "c")])
    assert (skipped.ok, skipped.error) == (False, "unavailable")
    assert skipped.text.startswith("Error: tool 'search' is unavailable: 2 earlier calls")
    assert ran.ok and ran.text == "ran c"
    assert hang.queries == ["a", "a", "a"]  # the skipped call never ran
    hang.release.set()
    deadline = time.monotonic() + 5
    while runner.hung("search") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.hung("search") == 0
    (late,) = runner.map([("search", "d")])
    assert late.ok and late.text == "late d"  # not a stale result of an abandoned call


EXIT_SCRIPT = """
import time
from aepo.rollout.tools.runner import ToolRunner

runner = ToolRunner({"search": lambda q: time.sleep(10**6)}, timeout_s=0.2)
print(runner.map([("search", "q")])[0].error)
"""


def test_a_hung_tool_does_not_block_interpreter_exit():
    """A ThreadPoolExecutor joins its threads at exit: this process would never end."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "timeout"
    assert time.perf_counter() - t0 < 30
