"""OS-level sandbox for running untrusted, model-written Python code.

The sandbox has two halves. The *host* half (:mod:`.host`, :func:`run_code`) runs in the caller:
it creates the per-call cgroups (:mod:`.cgroups`) and temporary directory, launches the sandbox,
enforces the wall-clock deadline and the output caps, and tears everything down. The *init* half
(:mod:`.init`) is a script executed as ``python -I -S init.py CONFIG`` inside fresh namespaces,
as root, where it builds the filesystem view, verifies it, then forks the untrusted interpreter
with dropped privileges and supervises it. Only the standard library is used on both sides, and
every restriction is enforced by the kernel, never by checks inside the untrusted interpreter.

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

from aepo.rollout.tools.sandbox.host import namespaces_unavailable_reason, run_code
from aepo.rollout.tools.sandbox.limits import (
    ISOLATIONS,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
)

__all__ = [
    "ISOLATIONS",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "namespaces_unavailable_reason",
    "run_code",
]
