"""Settings and outcome types of one sandboxed run."""

from __future__ import annotations

import sys
from dataclasses import dataclass

ISOLATIONS = ("namespaces", "none")


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
