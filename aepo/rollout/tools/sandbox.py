"""OS-level sandbox for running untrusted, model-written Python code.

This module has two halves. The *host* half (:func:`run_code`) runs in the caller: it creates the
per-call cgroups and temporary directory, launches the sandbox, enforces the wall-clock deadline
and the output caps, and tears everything down. The *init* half (:func:`_init_main`) is this same
file executed as a script (``python -I -S sandbox.py CONFIG``) inside fresh namespaces, as root,
where it builds the filesystem view, verifies it, then forks the untrusted interpreter with
dropped privileges and supervises it. Only the standard library is used on both sides, and every
restriction is enforced by the kernel, never by checks inside the untrusted interpreter.

Isolation, layer by layer (``isolation="namespaces"``, the default):

1. **Process tree.** util-linux ``unshare --net --mount --pid --fork --mount-proc --ipc --uts
   --kill-child`` starts the init in a new session (no controlling terminal, so no ``/dev/tty``
   or ``TIOCSTI`` games with the caller's terminal), with a minimal explicit environment: the
   caller's environment variables never reach the sandbox.
2. **Network namespace.** The only interface is a loopback that is down: no route to anything,
   not even to servers the caller listens on at ``127.0.0.1``. Abstract Unix sockets are scoped
   per network namespace, so the host's are unreachable too.
3. **PID namespace** with its own ``/proc``. The init is PID 1; the untrusted code cannot see or
   signal any process outside. When PID 1 exits the kernel SIGKILLs every process left in the
   namespace, so daemons (double fork + ``setsid``) die with the call. ``--kill-child`` delivers
   SIGKILL to the init if ``unshare`` itself dies.
4. **Mount namespace** (private propagation). The init (a) hides non-world-traversable ancestors
   of the interpreter (e.g. ``/root``) behind an empty tmpfs and binds back only the
   interpreter's prefix, so ``/root``'s other contents are invisible; (b) replaces ``/dev`` by a
   tmpfs holding only null, zero, full, random and urandom; (c) covers ``/tmp``, ``/var/tmp``,
   ``/run``, ``/dev/shm`` with empty tmpfs (no host temp files, no host Unix sockets); (d) mounts
   a fresh size-limited tmpfs, owned by the sandbox uid, on the per-call working directory; then
   (e) makes *every* mount read-only, nosuid and nodev (the five device binds keep dev) with one
   recursive ``mount_setattr(2)`` on ``/`` -- this reaches hidden and stacked mounts too -- and
   clears read-only on the working directory alone. Before any untrusted code runs, the init
   re-reads ``/proc/self/mounts`` and refuses to continue unless every entry except the working
   directory is ``ro`` (fail closed), checks that only ``lo`` exists and that it is PID 1.
5. **Credentials.** The untrusted interpreter runs as uid/gid 65534 (nobody) with no
   supplementary groups, an empty capability bounding set and ``no_new_privs``; the init checks
   that ``setuid(0)`` fails. Without ``CAP_SYS_ADMIN`` it cannot remount anything read-write; a
   user namespace it might create only gets copies of the mounts whose read-only flag the kernel
   locks. Dropping root also means plain file permissions guard the host as a second layer
   (e.g. raw disk devices are root-only).
6. **cgroup v1, one pair per call** (created under the caller's own cgroups, removed after).
   ``pids.max`` bounds processes *and threads* of the whole tree, so fork bombs fail with
   ``EAGAIN``. We use it rather than ``RLIMIT_NPROC`` because that limit never binds uid 0 and, for
   uid 65534, counts every process of that uid on the machine: concurrent sandboxes (and any
   host daemon running as nobody) would starve each other. ``memory.limit_in_bytes`` (and
   ``memory.memsw.limit_in_bytes``) bounds the resident memory of the whole tree, including
   files written to the tmpfs working directory; the kernel OOM-kills inside the group only.
7. **rlimits** on the untrusted interpreter: ``RLIMIT_AS`` (per-process address space; most
   large allocations raise ``MemoryError``), ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL),
   ``RLIMIT_FSIZE`` (largest file), ``RLIMIT_CORE`` = 0 and ``RLIMIT_NOFILE``.
8. **Supervision.** The host reads stdout/stderr non-blockingly and keeps at most
   ``max_output_bytes`` of each (stdout: the head, stderr: the tail); a flood kills the sandbox.
   At the wall-clock deadline (counted from when the sandbox reports ready, capped at
   ``timeout_s + setup_grace_s`` after launch) it SIGKILLs every task in the pids cgroup, waits
   for ``unshare`` to reap the namespace init (whose exit reaps the whole namespace), waits for
   the cgroup to be empty and removes it. The init has its own backstop timer, so the tree dies
   even if the caller is killed mid-call.

Not enforced: there is no seccomp filter, so the kernel's whole syscall surface is reachable
(kernel exploits are out of scope); the filesystem is readable wherever plain permissions allow
uid 65534 to read; CPU *share* is not limited (only CPU time and wall time). Consequences of the
design: ``multiprocessing`` pools and locks fail (their POSIX semaphores need a writable
``/dev/shm``; ``multiprocessing.Process`` and ``subprocess`` work), threads count against
``max_processes``, and the tmpfs working directory's files count against the memory limit.

``isolation="none"`` runs the same launcher without namespaces, cgroups or privilege drop: only
rlimits, the timeout, output caps and process-group killing apply. It is for trusted code only.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ISOLATIONS = ("namespaces", "none")
SCRIPT_NAME = "main.py"
_CGROUP_ROOT = "/sys/fs/cgroup"
_INIT_OVERHEAD_MB = 32  # resident memory of the sandbox init, charged to the same memory cgroup
_STDERR_FLOOD_FACTOR = 4  # stderr beyond this many max_output_bytes counts as a flood
_HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")
_DEV_NODES = ("null", "zero", "full", "random", "urandom")

# Linux ABI constants (x86_64 and every architecture with the unified syscall table).
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND = 0x2, 0x4, 0x8, 0x1000
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38

_counter_lock = threading.Lock()
_counter = 0
_probed_ok: set[tuple[str, str]] = set()


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be established here; the code was not run."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits and launch settings for one sandboxed run."""

    timeout_s: float = 5.0  # wall clock for the untrusted code
    memory_mb: int = 256  # RLIMIT_AS per process and (plus init overhead) the memory cgroup
    max_processes: int = 16  # pids.max for the untrusted tree (processes and threads)
    max_output_bytes: int = 8192  # kept per stream; more stdout kills the run
    max_file_mb: int = 16  # RLIMIT_FSIZE
    disk_mb: int = 64  # size of the tmpfs working directory
    python: str = sys.executable  # interpreter that runs the untrusted code
    uid: int = 65534
    gid: int = 65534
    setup_grace_s: float = 2.0  # extra wall time allowed for building the sandbox
    unshare: str = "unshare"


@dataclass
class SandboxResult:
    """Raw outcome of one run: captured bytes and how the untrusted interpreter ended."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int | None = None  # None when killed by a signal, timed out or lost
    signal: int | None = None
    timed_out: bool = False
    output_limited: bool = False
    oom_killed: bool = False  # the memory cgroup OOM-killed something
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


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
        parent = _own_cgroup_dir(controller)
        if parent is None:
            return f"cgroup v1 `{controller}` controller not mounted at {_CGROUP_ROOT}/{controller}"
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
    cgroups = _Cgroups.create(limits) if isolate else None
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


def _init_config(workdir: str, limits: SandboxLimits, isolate: bool, status_fd: int) -> dict:
    """The JSON configuration handed to the init (see :func:`_init_main`)."""
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
    code: str, workdir: str, limits: SandboxLimits, isolate: bool, cgroups: _Cgroups | None
) -> tuple[subprocess.Popen, int]:
    """Start the init (inside ``unshare`` when isolating) and feed it the code on stdin."""
    status_r, status_w = os.pipe()
    cfg = _init_config(workdir, limits, isolate, status_w)
    cfg["cgroup_procs"] = cgroups.procs_files() if cgroups is not None else []
    cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)]
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


def _terminate(proc: subprocess.Popen, cgroups: _Cgroups | None) -> None:
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


def _own_cgroup_dir(controller: str) -> str | None:
    """The caller's cgroup v1 directory for ``controller`` (new groups go below it)."""
    mount = os.path.join(_CGROUP_ROOT, controller)
    if not os.path.exists(os.path.join(mount, "cgroup.procs")):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    candidate = os.path.join(mount, path.lstrip("/"))
                    return candidate if os.path.isdir(candidate) else mount
    except OSError:
        pass
    return mount


class _Cgroups:
    """The per-call pids and memory cgroup v1 pair."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs

    @classmethod
    def create(cls, limits: SandboxLimits) -> _Cgroups:
        """Create both groups with their limits; raise SandboxUnavailable if impossible."""
        global _counter
        with _counter_lock:
            _counter += 1
            name = f"aepo-py-{os.getpid()}-{_counter}-{os.urandom(3).hex()}"
        mem = (limits.memory_mb + _INIT_OVERHEAD_MB) * 1024 * 1024
        settings = {
            "pids": [("pids.max", limits.max_processes + 1)],  # +1: the namespace init
            "memory": [
                ("memory.limit_in_bytes", mem),
                ("memory.memsw.limit_in_bytes", mem),
                ("memory.swappiness", 0),
            ],
        }
        group = cls({})
        try:
            for controller, values in settings.items():
                parent = _own_cgroup_dir(controller)
                if parent is None:
                    raise SandboxUnavailable(f"cgroup v1 `{controller}` controller not mounted")
                group.dirs[controller] = os.path.join(parent, name)
                os.mkdir(group.dirs[controller])
                for filename, value in values:
                    path = os.path.join(group.dirs[controller], filename)
                    if os.path.exists(path) or filename != "memory.memsw.limit_in_bytes":
                        _write_file(path, str(value))
        except OSError as exc:
            group.remove()
            raise SandboxUnavailable(f"cannot set up cgroups: {exc}") from exc
        return group

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the init writes itself into."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        """Host pids of every process still in either group."""
        found: set[int] = set()
        for path in self.procs_files():
            with contextlib.suppress(OSError), open(path) as f:
                found.update(int(tok) for tok in f.read().split())
        return found

    def kill_all(self) -> None:
        """SIGKILL every process in the groups (the pid namespace cannot refill them)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def oom_kills(self) -> int:
        """How many processes the memory cgroup's OOM killer killed."""
        path = os.path.join(self.dirs.get("memory", ""), "memory.oom_control")
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self, timeout_s: float = 3.0) -> None:
        """Kill stragglers, wait until both groups are empty, then delete them."""
        deadline = time.monotonic() + timeout_s
        while self.dirs:
            self.kill_all()
            for controller, path in list(self.dirs.items()):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # still busy: tasks are exiting
                del self.dirs[controller]
            if self.dirs and time.monotonic() > deadline:
                raise RuntimeError(f"sandbox cgroups did not empty: {sorted(self.dirs.values())}")
            if self.dirs:
                time.sleep(0.005)


def _write_file(path: str, text: str) -> None:
    """Write ``text`` to an existing control file (cgroupfs, procfs)."""
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------
# Init side: runs as root inside the namespaces (``python -I -S sandbox.py CONFIG``)
# --------------------------------------------------------------------------------------------


class _MountAttr(ctypes.Structure):
    _fields_ = [  # ctypes layout of struct mount_attr
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    """libc with errno capture and the argument types of the calls used here."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(rc: int, what: str) -> None:
    """Raise OSError with errno if a libc call returned non-zero."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2) through libc."""

    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    rc = _libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data or None))
    _check(rc, f"mount {target}")


def _mount_setattr(path: str, recursive: bool, attr_set: int, attr_clr: int = 0) -> None:
    """mount_setattr(2) (Linux >= 5.12): change per-mount flags, optionally on a whole tree."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    rc = _libc().syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(int(rc), f"mount_setattr {path}")


def _tmpfs(target: str, options: str) -> None:
    """Mount a fresh, private tmpfs on ``target``."""
    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, options)


def _is_under(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or lies below it (both absolute and normalised)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _expose_roots(roots: list[str]) -> None:
    """Make each root reachable by uid 65534 without exposing its blocked ancestors' contents.

    Every strict ancestor lacking the world-execute bit (e.g. ``/root``, mode 0700) is covered
    by an empty tmpfs (mode 0755) into which only the child entry leading to a root is bound
    back, through an ``O_PATH`` descriptor opened before the cover hid it."""
    blocked = set()
    for root in roots:
        parts = root.strip("/").split("/")
        for depth in range(len(parts) - 1):
            ancestor = "/" + "/".join(parts[: depth + 1])
            if not os.stat(ancestor).st_mode & 0o001:
                blocked.add(ancestor)
    for ancestor in sorted(blocked, key=lambda p: p.count("/")):
        children = {r[len(ancestor) + 1 :].split("/")[0] for r in roots if _is_under(r, ancestor)}
        fds = {name: os.open(os.path.join(ancestor, name), os.O_PATH) for name in children}
        _tmpfs(ancestor, "size=64k,mode=0755")
        for name, fd in fds.items():
            target = os.path.join(ancestor, name)
            os.mkdir(target, 0o755)
            _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND)
            os.close(fd)


def _minimal_dev() -> None:
    """Replace /dev by a tmpfs with a few harmless character devices and the usual links."""
    fds = {n: os.open(f"/dev/{n}", os.O_PATH) for n in _DEV_NODES if os.path.exists(f"/dev/{n}")}
    _mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name, fd in fds.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, _MS_BIND)
        os.close(fd)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")
    os.mkdir("/dev/shm", 0o755)


def _build_filesystem(cfg: dict) -> None:
    """Assemble the sandbox's view of the filesystem, then make all of it but the workdir ro."""
    roots, workdir = cfg["roots"], cfg["workdir"]
    _expose_roots(roots)
    _minimal_dev()
    for path in cfg["hide"]:
        real = os.path.realpath(path)
        if os.path.isdir(real) and not any(_is_under(r, real) for r in roots):
            _tmpfs(real, "size=64k,mode=0755")
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    _tmpfs(workdir, f"size={cfg['disk_mb']}m,mode=0700,uid={cfg['uid']},gid={cfg['gid']}")
    # One recursive call reaches every mount, hidden and stacked ones included.
    _mount_setattr("/", True, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV)
    for name in _DEV_NODES:
        if os.path.exists(f"/dev/{name}"):
            _mount_setattr(f"/dev/{name}", False, 0, _MOUNT_ATTR_NODEV)
    _mount_setattr(workdir, False, 0, _MOUNT_ATTR_RDONLY)


def _mounts() -> list[tuple[str, list[str]]]:
    """(mountpoint, options) for every entry of /proc/self/mounts, octal escapes decoded."""
    entries = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            entries.append((point, fields[3].split(",")))
    return entries


def _verify_isolation(cfg: dict) -> None:
    """Fail closed unless the namespaces and mounts are exactly what the docstring promises."""
    workdir = cfg["workdir"]
    for mountpoint, options in _mounts():
        writable = "rw" in options
        if mountpoint == workdir and not writable:
            raise RuntimeError(f"working directory {workdir} is not writable")
        if mountpoint != workdir and writable:
            raise RuntimeError(f"mount {mountpoint} is still writable")
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        raise RuntimeError(f"network namespace has interfaces {interfaces}")
    if os.getpid() != 1:
        raise RuntimeError("not PID 1 of a fresh PID namespace")


def _drop_privileges(uid: int, gid: int) -> None:
    """Become uid/gid with no groups, no capabilities and no way back (no_new_privs)."""
    libc = _libc()
    for cap in range(64):  # capabilities are numbered densely; EINVAL past the last one
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("privilege drop failed: uid 0 could be regained")


def _exec_user_code(cfg: dict) -> None:
    """In the forked child: apply limits, drop privileges and exec the interpreter."""
    try:
        if cfg["isolate"]:
            os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.closerange(3, 1 << 16)  # includes the status pipe
        for name, (soft, hard) in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if cfg["isolate"]:
            _drop_privileges(cfg["uid"], cfg["gid"])
        os.chdir(cfg["workdir"])
        python = cfg["python"]
        os.execve(python, [python, "-s", "-B", SCRIPT_NAME], cfg["env"])
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"sandbox: cannot start the interpreter: {exc}\n".encode())
    os._exit(127)


def _supervise(pid: int, wall_limit_s: float, status_fd: int) -> None:
    """Wait for the interpreter, report how it ended and exit (taking the namespace down)."""

    def on_alarm(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.write(status_fd, b"timeout\n")
        os._exit(0)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, wall_limit_s)
    _, status = os.waitpid(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if os.WIFSIGNALED(status):
        line = f"signal {os.WTERMSIG(status)}\n"
    else:
        line = f"exit {os.waitstatus_to_exitcode(status)}\n"
    with contextlib.suppress(OSError):
        os.write(status_fd, line.encode())
    os._exit(0)


def _init_main(argv: list[str]) -> None:
    """Entry point of the sandbox init (see the module docstring)."""
    cfg = json.loads(argv[1])
    status_fd = cfg["status_fd"]
    try:
        for procs in cfg["cgroup_procs"]:
            _write_file(procs, "0")  # "0" moves the writing process itself
        code = sys.stdin.buffer.read()
        if cfg["isolate"]:
            _write_file("/proc/self/oom_score_adj", "1000")  # inherited: OOM-kill us first
            _build_filesystem(cfg)
            _verify_isolation(cfg)
        script = os.path.join(cfg["workdir"], SCRIPT_NAME)
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(code)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        os.write(status_fd, f"error {message}\n".encode())
        os._exit(70)
    os.write(status_fd, b"ready\n")
    pid = os.fork()
    if pid == 0:
        _exec_user_code(cfg)
    _supervise(pid, cfg["wall_limit_s"], status_fd)


if __name__ == "__main__":
    _init_main(sys.argv)
