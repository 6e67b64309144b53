"""Per-call cgroup v1 pair (pids and memory) that bounds and reaps a sandboxed process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from aepo.rollout.tools.sandbox.init import write_file
from aepo.rollout.tools.sandbox.limits import SandboxLimits, SandboxUnavailable

CGROUP_ROOT = "/sys/fs/cgroup"
INIT_OVERHEAD_MB = 32  # resident memory of the sandbox init, charged to the same memory cgroup

_counter_lock = threading.Lock()
_counter = 0


def own_cgroup_dir(controller: str) -> str | None:
    """The caller's cgroup v1 directory for ``controller`` (new groups go below it)."""
    mount = os.path.join(CGROUP_ROOT, controller)
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


class Cgroups:
    """The per-call pids and memory cgroup v1 pair."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs

    @classmethod
    def create(cls, limits: SandboxLimits) -> Cgroups:
        """Create both groups with their limits; raise SandboxUnavailable if impossible."""
        global _counter
        with _counter_lock:
            _counter += 1
            name = f"aepo-py-{os.getpid()}-{_counter}-{os.urandom(3).hex()}"
        mem = (limits.memory_mb + INIT_OVERHEAD_MB) * 1024 * 1024
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
                parent = own_cgroup_dir(controller)
                if parent is None:
                    raise SandboxUnavailable(f"cgroup v1 `{controller}` controller not mounted")
                group.dirs[controller] = os.path.join(parent, name)
                os.mkdir(group.dirs[controller])
                for filename, value in values:
                    path = os.path.join(group.dirs[controller], filename)
                    if os.path.exists(path) or filename != "memory.memsw.limit_in_bytes":
                        write_file(path, str(value))
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
