"""Tool calls with a deadline: the rollout's backstop against user tools that hang or crash.

Each call runs on its own daemon thread, at most ``workers`` at once. A call still running
``timeout_s`` after it started is answered with ``ok=False, error="timeout"`` and its thread is
abandoned: Python cannot kill a thread, so it runs on until the tool returns (its late result is
dropped), but nothing ever waits for it, and as a daemon it does not hold up interpreter exit
(where it is stopped without cleanup). A ``concurrent.futures`` pool would not do: its threads
are joined at exit, so one hung call keeps the process alive forever. To bound the pile-up, a
tool with ``max_hung`` abandoned threads still alive is not called again until one of them ends:
its calls get ``ok=False, error="unavailable"`` at once. So at most ``max_hung + workers - 1``
threads per tool are ever stranded (what they hold, sockets or memory, stays held), and a batch
of calls takes at most about ``ceil(calls / workers) * timeout_s``. One batch at a time.

An exception in a tool, a return value that is not a :class:`ToolOutput` and a tool name with no
tool become ``ok=False`` outputs too. Built-in tools have their own, tighter limits (the python
sandbox kills its process, search has a deadline); this catches the rest.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

from aepo.rollout.tools.base import Tool, ToolOutput


class ToolRunner:
    """Runs batches of ``(tool name, query)`` calls; never raises for what a tool does.

    Args:
        tools: tag name -> tool.
        workers: calls that run at once.
        timeout_s: per-call deadline, from the moment the call starts.
        max_hung: abandoned calls still running, per tool, past which the tool is skipped.
    """

    def __init__(
        self,
        tools: Mapping[str, Tool],
        workers: int = 4,
        timeout_s: float = 30.0,
        max_hung: int = 8,
    ):
        if workers < 1 or max_hung < 1:
            raise ValueError(f"workers and max_hung must be >= 1, got {workers}, {max_hung}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.tools, self.workers = dict(tools), workers
        self.timeout_s, self.max_hung = timeout_s, max_hung
        self._hung: dict[str, list[threading.Thread]] = {}  # tool -> abandoned threads

    def hung(self, tool: str) -> int:
        """Abandoned calls of ``tool`` that are still running."""
        alive = [t for t in self._hung.get(tool, []) if t.is_alive()]
        self._hung[tool] = alive
        return len(alive)

    def map(self, calls: Sequence[tuple[str, str]]) -> list[ToolOutput]:
        """One output per call, in order; returns by each call's deadline, never later."""
        results: list[ToolOutput | None] = [None] * len(calls)
        done: queue.SimpleQueue = queue.SimpleQueue()  # (index, output); this batch only
        todo = deque(range(len(calls)))
        running: dict[int, tuple[float, threading.Thread]] = {}  # index -> (deadline, thread)
        while todo or running:
            while todo and len(running) < self.workers:
                i = todo.popleft()
                tool, query = calls[i]
                if self.hung(tool) >= self.max_hung:
                    results[i] = self._unavailable(tool)
                    continue
                thread = threading.Thread(
                    target=_work,
                    args=(self.tools, tool, query, i, done),
                    name=f"aepo-tool-{tool}",
                    daemon=True,
                )
                thread.start()
                running[i] = (time.monotonic() + self.timeout_s, thread)
            if not running:
                continue
            wait = min(deadline for deadline, _ in running.values()) - time.monotonic()
            for i, out in _drain(done, max(wait, 0.0)):
                if running.pop(i, None) is not None:  # else: a late result, already timed out
                    results[i] = out
            now = time.monotonic()
            for i, (deadline, thread) in list(running.items()):
                if deadline <= now:
                    del running[i]
                    results[i] = self._timeout(calls[i][0])
                    self._hung.setdefault(calls[i][0], []).append(thread)
        return results  # type: ignore[return-value]

    def _timeout(self, tool: str) -> ToolOutput:
        text = f"Error: tool {tool!r} timed out after {self.timeout_s:g} s"
        return ToolOutput(text=text, ok=False, error="timeout", elapsed_s=self.timeout_s)

    def _unavailable(self, tool: str) -> ToolOutput:
        text = (
            f"Error: tool {tool!r} is unavailable: {self.max_hung} earlier calls are still "
            f"running past the {self.timeout_s:g} s deadline"
        )
        return ToolOutput(text=text, ok=False, error="unavailable")


def call_tool(tools: Mapping[str, Tool], tool: str, query: str) -> ToolOutput:
    """Run one call in this thread; a missing tool, an exception (``SystemExit`` too) or a
    return value that is not a :class:`ToolOutput` with ``str`` text becomes an ``ok=False``
    output naming it."""
    start = time.perf_counter()
    try:
        fn = tools.get(tool)
        if fn is None:
            return ToolOutput(f"Error: no tool named {tool!r}", ok=False, error="unknown tool")
        out = fn(query)
    except (Exception, SystemExit) as exc:  # a tool failure must not end the rollout
        text = f"Error: tool {tool!r} raised {type(exc).__name__}: {exc}"
        return ToolOutput(text, ok=False, error="exception", elapsed_s=time.perf_counter() - start)
    if isinstance(out, ToolOutput) and isinstance(out.text, str):
        return out
    what = type(out).__name__
    if isinstance(out, ToolOutput):
        what = f"a ToolOutput whose text is {type(out.text).__name__}"
    text = f"Error: tool {tool!r} returned {what}, not a ToolOutput with str text"
    return ToolOutput(text, ok=False, error="bad return", elapsed_s=time.perf_counter() - start)


def _work(tools, tool: str, query: str, index: int, done: queue.SimpleQueue) -> None:
    done.put((index, call_tool(tools, tool, query)))


def _drain(done: queue.SimpleQueue, timeout: float) -> list[tuple[int, ToolOutput]]:
    """The results that arrive within ``timeout`` s of waiting for the first, and any queued."""
    try:
        items = [done.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(done.get_nowait())
        except queue.Empty:
            return items
