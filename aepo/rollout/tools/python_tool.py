"""``PythonTool``: run model-written Python code in an OS-enforced sandbox.

Fixes defect 7 of the reference code (AEPO_SPEC.md section 6): the released tool ran the
policy's code with no sandbox at all. Here every call runs in a fresh process tree isolated by
Linux namespaces, cgroups, a privilege drop and rlimits; the mechanism is described layer by
layer in :mod:`aepo.rollout.tools.sandbox`. In short, the code:

* has no network (new network namespace with only a down loopback);
* can write only its own fresh tmpfs working directory (every other mount is read-only;
  ``/tmp``, ``/var/tmp``, ``/run`` and ``/dev/shm`` are empty read-only tmpfs);
* sees none of the caller's environment variables and none of its processes (PID namespace);
* runs as uid 65534 with no capabilities, so it cannot undo any of the above;
* is bounded in memory (RLIMIT_AS and a memory cgroup), processes and threads (a pids
  cgroup), CPU time (RLIMIT_CPU), file size (RLIMIT_FSIZE), wall time and output size;
* dies with its whole process tree when the call ends, daemons included.

``isolation="namespaces"`` (the default) refuses to construct, raising
:class:`SandboxUnavailable` with the missing piece named, when that isolation cannot be built
(not root, no ``unshare``, no cgroup v1 controllers...). It never falls back silently.

``isolation="none"`` is an explicit opt-in for TRUSTED code only: no namespaces, no cgroups, no
privilege drop. The code can read and write everything the caller can, reach the network and
leave daemons behind; only the rlimits, timeout and output cap apply. Never use it for
model-written code.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import warnings
from collections import OrderedDict

from aepo.rollout.tools.base import ToolOutput
from aepo.rollout.tools.sandbox import (
    ISOLATIONS,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    namespaces_unavailable_reason,
    run_code,
)

__all__ = ["PythonTool", "SandboxUnavailable"]

_SIGXCPU = 24


class PythonTool:
    """``tool(code) -> ToolOutput``: run ``code`` as a Python script in a sandbox.

    ``text`` is the program's stdout; when the run fails it is followed by the tail of stderr
    (the traceback) and, for timeouts and limits, a one-line explanation such as
    ``TimeoutError: execution exceeded 5.0 s``. ``error`` is ``None`` on success, else one of
    ``"timeout"``, ``"output limit"``, ``"memory"``, ``"cpu time"``, ``"exit code N"``,
    ``"signal N"`` or ``"killed"``. Identical code is served from an LRU cache
    (``cached=True``); set ``cache_size=0`` to disable it."""

    name = "python"

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 256,
        max_processes: int = 16,
        max_output_bytes: int = 8192,
        isolation: str = "namespaces",
        python: str = sys.executable,
        *,
        max_file_mb: int = 16,
        disk_mb: int = 64,
        cache_size: int = 256,
    ) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0 or max_output_bytes <= 0:
            raise ValueError("timeout_s, memory_mb, max_processes, max_output_bytes must be > 0")
        self.limits = SandboxLimits(
            timeout_s=float(timeout_s),
            memory_mb=int(memory_mb),
            max_processes=int(max_processes),
            max_output_bytes=int(max_output_bytes),
            max_file_mb=int(max_file_mb),
            disk_mb=int(disk_mb),
            python=python,
        )
        self.isolation = isolation
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, ToolOutput] = OrderedDict()
        self._lock = threading.Lock()
        if isolation == "namespaces":
            reason = namespaces_unavailable_reason(python)
            if reason is not None:
                raise SandboxUnavailable(f"PythonTool(isolation='namespaces'): {reason}")
        else:
            warnings.warn(
                "PythonTool(isolation='none') runs code WITHOUT any sandbox: "
                "use it only for trusted code, never for model-written code",
                RuntimeWarning,
                stacklevel=2,
            )

    @classmethod
    def available(cls, python: str = sys.executable) -> bool:
        """Whether ``isolation="namespaces"`` works on this machine (probed once)."""
        return namespaces_unavailable_reason(python) is None

    @staticmethod
    def unavailable_reason(python: str = sys.executable) -> str | None:
        """Why ``isolation="namespaces"`` cannot work here, or None when it can."""
        return namespaces_unavailable_reason(python)

    def __call__(self, code: str) -> ToolOutput:
        """Run ``code`` (markdown fences are stripped) and describe the outcome."""
        code = strip_code_fences(code)
        with self._lock:
            hit = self._cache.get(code)
            if hit is not None:
                self._cache.move_to_end(code)
                return dataclasses.replace(hit, cached=True)
        output = self._format(run_code(code, self.limits, self.isolation))
        if self.cache_size > 0:
            with self._lock:
                self._cache[code] = output
                self._cache.move_to_end(code)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return output

    def _format(self, result: SandboxResult) -> ToolOutput:
        """Turn a raw :class:`SandboxResult` into the text and error the policy sees."""
        error, message = self._classify(result)
        stdout = result.stdout.decode("utf-8", errors="replace")
        if error is None:
            return ToolOutput(text=stdout, ok=True, error=None, elapsed_s=result.elapsed_s)
        stderr = result.stderr.decode("utf-8", errors="replace")
        if not message and not stderr.strip():
            message = f"Process finished with {error}"  # e.g. a bare sys.exit(3)
        text = _join_bounded(stdout, stderr, message, self.limits.max_output_bytes)
        return ToolOutput(text=text, ok=False, error=error, elapsed_s=result.elapsed_s)

    def _classify(self, result: SandboxResult) -> tuple[str | None, str]:
        """(error, explanation line) for a run; error None means success."""
        limits = self.limits
        last_err = result.stderr.decode("utf-8", errors="replace").strip().rsplit("\n", 1)[-1]
        if result.output_limited:
            return "output limit", f"[output truncated: more than {limits.max_output_bytes} bytes]"
        if result.timed_out:
            return "timeout", f"TimeoutError: execution exceeded {limits.timeout_s} s"
        if result.exit_code == 0:
            return None, ""
        if last_err.startswith("MemoryError"):
            return "memory", ""  # the traceback already says it
        if result.oom_killed:
            return "memory", f"MemoryError: memory limit of {limits.memory_mb} MB exceeded"
        if result.signal == _SIGXCPU:
            return "cpu time", "TimeoutError: CPU time limit exceeded"
        if result.exit_code is not None:
            return f"exit code {result.exit_code}", ""
        if result.signal is not None:
            return f"signal {result.signal}", f"Killed by signal {result.signal}"
        return "killed", "Killed: the sandbox terminated unexpectedly"


def _join_bounded(stdout: str, stderr: str, message: str, limit: int) -> str:
    """stdout, then the tail of stderr, then ``message``; stdout+stderr kept within ``limit``.

    When both do not fit, the traceback tail keeps up to half of the budget."""
    if len(stdout) + len(stderr) > limit:
        stderr = stderr[-max(limit // 2, limit - len(stdout)) :]
        stdout = stdout[: max(0, limit - len(stderr))]
    parts = [stdout.rstrip("\n"), stderr.rstrip("\n"), message]
    return "\n".join(part for part in parts if part)


def strip_code_fences(code: str) -> str:
    """Remove a surrounding markdown fence (```python ... ```) if the policy wrote one."""
    stripped = code.strip()
    if not stripped.startswith("```"):
        return code
    lines = stripped.split("\n")
    body = lines[1:]
    if body and body[-1].strip() == "```":
        body = body[:-1]
    return "\n".join(body) + "\n"
