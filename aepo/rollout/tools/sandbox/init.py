"""Sandbox init: runs as root inside fresh namespaces, builds the view, then runs the code.

Executed as a script by the host half (``python -I -S init.py CONFIG``, CONFIG being the JSON
from :func:`aepo.rollout.tools.sandbox.host.init_config`), so it uses the standard library only
and imports nothing from the package. See the package docstring for what each layer enforces.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import resource
import signal
import socket
import sys

SCRIPT_NAME = "main.py"
DEV_NODES = ("null", "zero", "full", "random", "urandom")

# Linux ABI constants (x86_64 and every architecture with the unified syscall table).
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND = 0x2, 0x4, 0x8, 0x1000
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38


def write_file(path: str, text: str) -> None:
    """Write ``text`` to an existing control file (cgroupfs, procfs)."""
    with open(path, "w") as f:
        f.write(text)


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
    fds = {n: os.open(f"/dev/{n}", os.O_PATH) for n in DEV_NODES if os.path.exists(f"/dev/{n}")}
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
    for name in DEV_NODES:
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


def main(argv: list[str]) -> None:
    """Entry point of the sandbox init (see the module docstring)."""
    cfg = json.loads(argv[1])
    status_fd = cfg["status_fd"]
    try:
        for procs in cfg["cgroup_procs"]:
            write_file(procs, "0")  # "0" moves the writing process itself
        code = sys.stdin.buffer.read()
        if cfg["isolate"]:
            write_file("/proc/self/oom_score_adj", "1000")  # inherited: OOM-kill us first
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
    main(sys.argv)
