"""Host half of the sandbox: launch, watch, cap and tear down one run of untrusted code."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from aepo.rollout.tools.sandbox import init as init_script
from aepo.rollout.tools.sandbox.cgroups import CGROUP_ROOT, Cgroups, own_cgroup_dir
from aepo.rollout.tools.sandbox.limits import (
    ISOLATIONS,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
)

_STDERR_FLOOD_FACTOR = 4  # stderr beyond this many max_output_bytes counts as a flood
_HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")

_probed_ok: set[tuple[str, str]] = set()


def namespaces_unavailable_reason(
    python: str = sys.executable, unshare: str = "unshare"
) -> str | None:
    """Why ``isolation="namespaces"`` cannot work here, or None if it does (probed once)."""
    if not sys.platform.startswith("linux"):
        return f"namespaces isolation needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "namespaces isolation needs root (euid 0) to create namespaces and cgroups"
    if shutil.which(unshare) is None:
        return f"util-linux `{unshare}` not found on PATH"
    for ns in ("net", "mnt", "pid", "ipc", "uts"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return f"kernel lacks {ns} namespaces (/proc/self/ns/{ns})"
    for controller in ("pids", "memory"):
        parent = own_cgroup_dir(controller)
        if parent is None:
            return f"cgroup v1 `{controller}` controller not mounted at {CGROUP_ROOT}/{controller}"
        if not os.access(parent, os.W_OK):
            return f"cgroup directory {parent} is not writable"
    if (python, unshare) in _probed_ok:
        return None
    reason = _probe(python, unshare)
    if reason is None:
        _probed_ok.add((python, unshare))
    return reason


def _probe(python: str, unshare: str) -> str | None:
    """Run a trivial program through the full sandbox; return a failure reason or None."""
    limits = SandboxLimits(timeout_s=10.0, python=python, unshare=unshare)
    try:
        result = run_code("print('sandbox-ok')", limits, "namespaces")
    except (SandboxUnavailable, OSError) as exc:
        return f"sandbox probe failed: {exc}"
    if result.stdout.strip() != b"sandbox-ok":
        tail = result.stderr.decode(errors="replace")[-500:]
        return f"sandbox probe failed (exit {result.exit_code}, signal {result.signal}): {tail}"
    return None


def run_code(code: str, limits: SandboxLimits, isolation: str = "namespaces") -> SandboxResult:
    """Run ``code`` as a script under ``limits``; never blocks much past the deadline.

    Raises :class:`SandboxUnavailable` if the sandbox could not be built (nothing ran)."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    isolate = isolation == "namespaces"
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="aepo-py-")
    cgroups = Cgroups.create(limits) if isolate else None
    try:
        proc, status_r = _launch(code, workdir, limits, isolate, cgroups)
        try:
            capture = _collect(proc, status_r, limits, start)
        finally:
            _terminate(proc, cgroups)
            os.close(status_r)
        if cgroups is not None:
            capture.result.oom_killed = cgroups.oom_kills() > 0
    finally:
        if cgroups is not None:
            cgroups.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    result = capture.finish(time.monotonic() - start)
    if capture.setup_error is not None:
        raise SandboxUnavailable(f"sandbox setup failed: {capture.setup_error}")
    if not capture.ready and not result.timed_out and not result.oom_killed:
        tail = result.stderr.decode(errors="replace")[-1000:]
        raise SandboxUnavailable(f"sandbox init exited before running the code: {tail}")
    return result


def _sandbox_env(workdir: str, python: str) -> dict[str, str]:
    """The complete environment of the untrusted interpreter (nothing is inherited)."""
    return {
        "PATH": f"{os.path.dirname(python)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }


def _interpreter_roots(python: str) -> list[str]:
    """Directories the untrusted interpreter must be able to reach (prefix and venv)."""
    roots = {
        os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(python)))),
        os.path.realpath(os.path.dirname(os.path.dirname(os.path.realpath(python)))),
    }
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        roots.update(os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix))
    return sorted(roots)


def init_config(workdir: str, limits: SandboxLimits, isolate: bool, status_fd: int) -> dict:
    """The JSON configuration handed to the init (see :mod:`.init`)."""
    mib = 1024 * 1024
    cpu_s = math.ceil(limits.timeout_s) + 1
    nofile = min(256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    return {
        "isolate": isolate,
        "status_fd": status_fd,
        "workdir": workdir,
        "python": limits.python,
        "env": _sandbox_env(workdir, limits.python),
        "uid": limits.uid,
        "gid": limits.gid,
        "disk_mb": limits.disk_mb,
        "roots": _interpreter_roots(limits.python),
        "hide": list(_HIDDEN_DIRS),
        "wall_limit_s": limits.timeout_s + limits.setup_grace_s + 1.0,
        "rlimits": {
            "RLIMIT_AS": [limits.memory_mb * mib] * 2,
            "RLIMIT_CPU": [cpu_s, cpu_s + 1],
            "RLIMIT_FSIZE": [limits.max_file_mb * mib] * 2,
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_NOFILE": [nofile, nofile],
        },
    }


def _launch(
    code: str, workdir: str, limits: SandboxLimits, isolate: bool, cgroups: Cgroups | None
) -> tuple[subprocess.Popen, int]:
    """Start the init (inside ``unshare`` when isolating) and feed it the code on stdin."""
    status_r, status_w = os.pipe()
    cfg = init_config(workdir, limits, isolate, status_w)
    cfg["cgroup_procs"] = cgroups.procs_files() if cgroups is not None else []
    cmd = [sys.executable, "-I", "-S", os.path.abspath(init_script.__file__), json.dumps(cfg)]
    if isolate:
        namespaces = ["--net", "--mount", "--pid", "--fork", "--mount-proc", "--ipc", "--uts"]
        cmd = [limits.unshare, *namespaces, "--kill-child", "--propagation", "private", "--", *cmd]
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cfg["env"],
            cwd="/",
            pass_fds=(status_w,),
            start_new_session=True,
        )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    try:
        assert proc.stdin is not None
        proc.stdin.write(code.encode("utf-8", errors="replace"))  # lone surrogates
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the init died early; _collect sees it
    return proc, status_r


@dataclass
class _Capture:
    """Accumulates the sandbox's output streams and status lines during :func:`_collect`."""

    limit: int
    result: SandboxResult = field(default_factory=SandboxResult)
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stderr_total: int = 0
    status: bytearray = field(default_factory=bytearray)
    ready: bool = False
    final: bool = False
    setup_error: str | None = None

    def add_stdout(self, data: bytes) -> bool:
        """Keep the head of stdout; True once more than ``limit`` bytes arrived."""
        self.stdout += data[: self.limit + 1 - len(self.stdout)]
        return len(self.stdout) > self.limit

    def add_stderr(self, data: bytes) -> bool:
        """Keep the tail of stderr; True once a flood (many times ``limit``) arrived."""
        self.stderr_total += len(data)
        self.stderr += data
        del self.stderr[: max(0, len(self.stderr) - self.limit)]
        return self.stderr_total > _STDERR_FLOOD_FACTOR * self.limit

    def add_status(self, data: bytes) -> None:
        """Parse complete status lines written by the init."""
        self.status += data
        *lines, rest = self.status.split(b"\n")
        self.status = bytearray(rest)
        for raw in lines:
            kind, _, arg = raw.decode(errors="replace").partition(" ")
            if kind == "ready":
                self.ready = True
            elif kind == "error":
                self.setup_error, self.final = arg, True
            elif kind == "exit":
                self.result.exit_code, self.final = int(arg), True
            elif kind == "signal":
                self.result.signal, self.final = int(arg), True
            elif kind == "timeout":
                self.result.timed_out, self.final = True, True

    def finish(self, elapsed_s: float) -> SandboxResult:
        """The final :class:`SandboxResult` (stdout trimmed to the limit)."""
        self.result.stdout = bytes(self.stdout[: self.limit])
        self.result.stderr = bytes(self.stderr)
        self.result.elapsed_s = elapsed_s
        return self.result


def _collect(
    proc: subprocess.Popen, status_r: int, limits: SandboxLimits, start: float
) -> _Capture:
    """Read stdout, stderr and status until the run ends, the deadline passes or output floods."""
    capture = _Capture(limit=limits.max_output_bytes)
    hard_deadline = start + limits.timeout_s + limits.setup_grace_s
    deadline = hard_deadline
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err", status_r: "status"}
    with selectors.DefaultSelector() as sel:
        for fd, kind in streams.items():
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, kind)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                capture.result.timed_out = capture.result.timed_out or not capture.final
                break
            for key, _ in sel.select(remaining):
                try:
                    data = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                elif key.data == "status":
                    was_ready = capture.ready
                    capture.add_status(data)
                    now = time.monotonic()
                    if capture.ready and not was_ready:
                        deadline = min(now + limits.timeout_s, hard_deadline)
                    if capture.final:  # drain what is left, but do not wait on stray writers
                        deadline = min(deadline, now + 0.5)
                elif capture.add_stdout(data) if key.data == "out" else capture.add_stderr(data):
                    capture.result.output_limited = True
                    return capture
    return capture


def _terminate(proc: subprocess.Popen, cgroups: Cgroups | None) -> None:
    """Kill whatever is left of the run and reap ``unshare``/the launcher."""
    if cgroups is not None:
        cgroups.kill_all()  # includes the namespace init: its death reaps the namespace
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the group id is ours
    try:
        proc.wait(timeout=3.0)
    except subprocess.TimeoutExpired:
        proc.kill()  # --kill-child forwards SIGKILL to the namespace init
        proc.wait(timeout=3.0)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
