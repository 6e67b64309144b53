"""PythonTool: every isolation property is checked from inside the sandbox *and* on the host.

Code under test tags its processes with a unique 12-character marker (``prctl(PR_SET_NAME)``,
inherited by forked children), so ``/proc`` scans for survivors are exact; a positive control
shows that the scan does find a tagged process."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from aepo.rollout.tools import python_tool
from aepo.rollout.tools.base import Tool
from aepo.rollout.tools.python_tool import PythonTool, SandboxUnavailable
from aepo.rollout.tools.sandbox import cgroups, host

TIMEOUT_S = 2.0
GRACE_S = 2.0  # setup (~0.2 s idle, more on a loaded machine) + teardown beyond timeout_s


@pytest.fixture
def require_sandbox() -> None:
    reason = PythonTool.unavailable_reason()
    if reason is not None:
        pytest.skip(f"namespaces sandbox unavailable here: {reason}")


def make_tool(**kwargs) -> PythonTool:
    kwargs.setdefault("timeout_s", TIMEOUT_S)
    return PythonTool(**kwargs)


def new_marker() -> str:
    return "aepo" + uuid.uuid4().hex[:8]  # 12 chars: fits the 15-char comm field


def tagged(marker: str, body: str) -> str:
    """``body`` preceded by code that renames the process (and its future forks) to marker."""
    head = f"import ctypes\nctypes.CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n"
    return head + textwrap.dedent(body)


def survivors(marker: str) -> list[int]:
    """Pids whose name or command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in comm or marker.encode() in cmdline:
            found.append(int(entry))
    return found


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_proc_scan_finds_a_tagged_process() -> None:
    """Positive control for ``survivors``: an unsandboxed tagged sleeper is found."""
    marker = new_marker()
    code = tagged(marker, "import time\nprint('up', flush=True)\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert survivors(marker) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert survivors(marker) == []


def test_sandbox_available_where_its_prerequisites_are() -> None:
    """The sandbox fails closed, which would turn every test below into a skip: on a machine
    that has what it needs (root, unshare, cgroup v1 pids+memory), it must actually work."""
    have_cgroups = all(
        os.path.exists(f"/sys/fs/cgroup/{c}/cgroup.procs") for c in ("pids", "memory")
    )
    prerequisites = (
        sys.platform.startswith("linux")
        and os.geteuid() == 0
        and shutil.which("unshare") is not None
        and have_cgroups
    )
    if not prerequisites:
        pytest.skip("not root with util-linux unshare and cgroup v1 pids+memory")
    assert PythonTool.unavailable_reason() is None


def test_benign_code_prints_result(require_sandbox: None) -> None:
    tool = make_tool()
    assert isinstance(tool, Tool) and tool.name == "python"
    out = tool("print(sum(range(10)))\nprint('done')")
    assert out.ok and out.error is None and not out.cached
    assert out.text == "45\ndone\n"
    assert 0 < out.elapsed_s < TIMEOUT_S + GRACE_S


def test_exception_becomes_traceback_text(require_sandbox: None) -> None:
    out = make_tool()("print('before')\ndef f():\n    return 1 / 0\nf()\n")
    assert not out.ok and out.error == "exit code 1"
    assert out.text.startswith("before\n")
    assert "Traceback (most recent call last)" in out.text
    assert out.text.rstrip().endswith("ZeroDivisionError: division by zero")


def test_exit_code_without_traceback_is_explained(require_sandbox: None) -> None:
    out = make_tool()("import sys\nprint('partial')\nsys.exit(3)\n")
    assert not out.ok and out.error == "exit code 3"
    assert out.text == "partial\nProcess finished with exit code 3"


def test_code_fences_are_stripped(require_sandbox: None) -> None:
    out = make_tool()("```python\nprint(6 * 7)\n```")
    assert out.ok and out.text == "42\n"


def test_no_network_even_to_a_server_of_the_caller(require_sandbox: None) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        # Positive control: the server is reachable from outside the sandbox.
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            server.accept()[0].close()
        code = f"""
        import socket
        print("IFACES", [name for _, name in socket.if_nameindex()])
        for host, port in [("1.1.1.1", 53), ("127.0.0.1", {port}), ("localhost", {port})]:
            try:
                socket.create_connection((host, port), timeout=1).close()
                print("CONNECTED", host, port)
            except OSError as exc:
                print("BLOCKED", host, port, type(exc).__name__)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("1.1.1.1", 53))
            print("CONNECTED udp")
        except OSError as exc:
            print("BLOCKED udp", type(exc).__name__)
        """
        out = make_tool()(textwrap.dedent(code))
        assert out.ok, out.text
        assert "IFACES ['lo']" in out.text
        assert "CONNECTED" not in out.text
        assert out.text.count("BLOCKED") == 4
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the caller's server
    finally:
        server.close()


def test_writes_outside_the_workdir_fail(require_sandbox: None) -> None:
    name = f"aepo-sandbox-escape-{uuid.uuid4().hex}"
    targets = [
        f"/tmp/{name}",
        f"/root/{name}",
        f"/dev/shm/{name}",
        f"/var/tmp/{name}",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), name),
    ]
    code = f"""
    import os
    for path in {targets!r}:
        try:
            with open(path, "w") as f:
                f.write("escaped")
            print("WROTE", path)
        except OSError as exc:
            print("DENIED", path, type(exc).__name__)
    with open("inside.txt", "w") as f:
        f.write("kept")
    print("INSIDE", open("inside.txt").read())
    for line in open("/proc/self/mounts"):
        point, options = line.split()[1], line.split()[3].split(",")
        if "rw" in options:
            print("RW_MOUNT", point, point == os.getcwd())
    """
    try:
        out = make_tool()(textwrap.dedent(code))
        assert out.ok, out.text
        for path in targets:
            assert f"DENIED {path}" in out.text
            assert not os.path.exists(path)
        assert "WROTE" not in out.text
        assert "INSIDE kept" in out.text
        rw_lines = [line for line in out.text.splitlines() if line.startswith("RW_MOUNT")]
        assert len(rw_lines) == 1 and rw_lines[0].endswith(" True")  # only the workdir
    finally:
        for path in targets:
            if os.path.exists(path):
                os.remove(path)


def test_privileges_cannot_be_regained(require_sandbox: None) -> None:
    code = """
    import ctypes, os
    print("UID", os.getuid(), os.geteuid(), os.getgroups())
    for action, call in [("setuid", lambda: os.setuid(0)), ("kill-init", lambda: os.kill(1, 9))]:
        try:
            call()
            print("ALLOWED", action)
        except PermissionError:
            print("DENIED", action)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(None, b"/", None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, i.e. rw
    print("REMOUNT", rc, ctypes.get_errno())
    print("CAPS", [l.split()[1] for l in open("/proc/self/status") if l.startswith("Cap")])
    print("PIDS", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    """
    out = make_tool()(textwrap.dedent(code))
    assert out.ok, out.text
    assert "UID 65534 65534 []" in out.text
    assert "ALLOWED" not in out.text and out.text.count("DENIED") == 2
    assert "REMOUNT -1 1" in out.text  # EPERM
    caps_line = next(line for line in out.text.splitlines() if line.startswith("CAPS"))
    assert caps_line.count("'0000000000000000'") == 5  # inheritable/permitted/effective/bnd/amb
    assert "PIDS [1, 2]" in out.text  # the namespace init and this interpreter, nothing else


def test_workdir_is_fresh_per_call_and_removed(require_sandbox: None) -> None:
    tool = make_tool()
    first = tool("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert first.ok, first.text
    workdir = first.text.strip()
    assert workdir.startswith("/") and not os.path.exists(workdir)  # removed after the call
    second = tool("import os\nprint(sorted(os.listdir('.')))\n")
    assert second.ok and second.text.strip() == "['main.py']"


def test_environment_secret_is_not_visible(
    require_sandbox: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("AEPO_SANDBOX_TEST_SECRET", secret)
    code = """
    import glob, os
    print("ENV", sorted(os.environ.items()))
    for path in glob.glob("/proc/*/environ"):
        try:
            print("PROC", path, open(path, "rb").read())
        except OSError as exc:
            print("NOREAD", path, type(exc).__name__)
    """
    out = make_tool()(textwrap.dedent(code))
    assert out.ok, out.text
    assert "ENV" in out.text and "('PYTHONHASHSEED', '0')" in out.text
    assert secret not in out.text
    assert "AEPO_SANDBOX_TEST_SECRET" not in out.text


def test_infinite_loop_is_killed_at_the_timeout(require_sandbox: None) -> None:
    marker = new_marker()
    tool = make_tool()
    start = time.monotonic()
    out = tool(tagged(marker, "print('spinning', flush=True)\nwhile True:\n    pass\n"))
    wall = time.monotonic() - start
    assert not out.ok and out.error == "timeout"
    assert out.text.startswith("spinning\n")
    assert out.text.endswith(f"TimeoutError: execution exceeded {TIMEOUT_S} s")
    assert TIMEOUT_S * 0.95 <= wall < TIMEOUT_S + GRACE_S
    assert survivors(marker) == []


def test_sleeping_code_is_killed_at_the_timeout(require_sandbox: None) -> None:
    marker = new_marker()
    start = time.monotonic()
    out = make_tool()(tagged(marker, "import time\ntime.sleep(600)\n"))
    assert out.error == "timeout" and time.monotonic() - start < TIMEOUT_S + GRACE_S
    assert survivors(marker) == []


def test_memory_bomb_fails_without_harming_the_caller(require_sandbox: None) -> None:
    rss_before = max_rss_mb()
    out = make_tool(memory_mb=256)("x = bytearray(2 * 1024**3)\nprint('allocated', len(x))\n")
    assert not out.ok and out.error == "memory"
    assert "MemoryError" in out.text and "allocated" not in out.text
    assert max_rss_mb() - rss_before < 100


def test_memory_cgroup_bounds_the_whole_tree(require_sandbox: None) -> None:
    """Three children each touch 200 MB (each under RLIMIT_AS): the 256 MB cgroup OOM-kills."""
    code = """
    import os, time
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            block = bytearray(200 * 1024 * 1024)  # zero-filled, so resident
            time.sleep(1.0)
            os._exit(0)
        pids.append(pid)
    print("SIGNALS", sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids))
    """
    out = make_tool(memory_mb=256, timeout_s=5.0)(textwrap.dedent(code))
    assert out.ok, out.text
    assert "SIGNALS [-9" in out.text  # at least one child was SIGKILLed by the OOM killer


def test_fork_bomb_is_contained(require_sandbox: None) -> None:
    marker = new_marker()
    code = """
    import os, time
    forks = 0
    try:
        while True:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            forks += 1
    except OSError as exc:
        print("FORKS", forks, type(exc).__name__, flush=True)
    """
    out = make_tool(max_processes=8)(tagged(marker, code))
    assert out.ok, out.text
    assert "BlockingIOError" in out.text
    forks = int(out.text.split()[1])
    assert 1 <= forks < 8  # the interpreter plus its children stay within max_processes
    assert survivors(marker) == []


def test_exponential_fork_bomb_leaves_nothing_behind(require_sandbox: None) -> None:
    marker = new_marker()
    start = time.monotonic()
    out = make_tool(max_processes=16)(tagged(marker, "import os\nwhile True:\n    os.fork()\n"))
    assert not out.ok
    assert time.monotonic() - start < TIMEOUT_S + GRACE_S
    assert survivors(marker) == []


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    print('x' * 100)\n",
        "import sys\nsys.stdout.write('y' * 10**8)\n",
        "import sys\nwhile True:\n    sys.stderr.write('z' * 100)\n",
    ],
    ids=["print-loop", "one-huge-write", "stderr-loop"],
)
def test_output_flood_is_truncated(require_sandbox: None, code: str) -> None:
    rss_before = max_rss_mb()
    limit = 1000
    start = time.monotonic()
    out = make_tool(max_output_bytes=limit, timeout_s=3.0)(code)
    assert time.monotonic() - start < 3.0
    assert not out.ok and out.error == "output limit"
    assert len(out.text) <= limit + 100
    assert "[output truncated" in out.text
    assert max_rss_mb() - rss_before < 50


def test_daemon_does_not_survive_the_call(require_sandbox: None) -> None:
    marker = new_marker()
    code = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        os._exit(0)
    os.wait()
    print("parent done")
    """
    start = time.monotonic()
    out = make_tool(timeout_s=10.0)(tagged(marker, code))
    # A daemon still holding stdout must not stall the call until the timeout.
    assert out.ok and out.text == "parent done\n", out.text
    assert time.monotonic() - start < 5.0
    assert survivors(marker) == []


def test_limits_are_applied_by_the_kernel(require_sandbox: None) -> None:
    code = """
    import resource
    for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_CORE"):
        print(name, resource.getrlimit(getattr(resource, name))[0])
    for line in open("/proc/self/cgroup"):
        _, controller, path = line.strip().split(":", 2)
        if controller == "pids":
            print("PIDS_MAX", open(f"/sys/fs/cgroup/pids{path}/pids.max").read().strip())
        if controller == "memory":
            limit = open(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read()
            print("MEM_LIMIT_MB", int(limit) // 2**20)
    try:
        open("big.bin", "wb").write(b"0" * (2 * 2**20))
    except OSError as exc:
        print("FSIZE", exc.strerror)
    """
    out = make_tool(memory_mb=200, max_processes=5, max_file_mb=1)(textwrap.dedent(code))
    assert out.ok, out.text
    assert f"RLIMIT_AS {200 * 2**20}" in out.text
    assert f"RLIMIT_CPU {int(TIMEOUT_S) + 1}" in out.text
    assert f"RLIMIT_FSIZE {2**20}" in out.text and "RLIMIT_CORE 0" in out.text
    assert "PIDS_MAX 6" in out.text  # 5 for the code + the namespace init
    assert "MEM_LIMIT_MB 232" in out.text  # 200 + init overhead
    assert "FSIZE File too large" in out.text


def test_per_call_cgroups_are_removed(require_sandbox: None) -> None:
    tool = make_tool()
    assert tool("print(1)").ok
    prefix = f"aepo-py-{os.getpid()}-"
    for controller in ("pids", "memory"):
        parent = cgroups.own_cgroup_dir(controller)
        assert parent is not None
        assert not [d for d in os.listdir(parent) if d.startswith(prefix)]


def test_identical_code_is_cached(require_sandbox: None) -> None:
    tool = make_tool(cache_size=2)
    first = tool("import random\nprint(random.random())")
    second = tool("import random\nprint(random.random())")
    assert not first.cached and second.cached and second.ok
    assert second.text == first.text
    tool("print(1)")
    tool("print(2)")  # evicts the random program (LRU of size 2)
    assert not tool("import random\nprint(random.random())").cached
    uncached = make_tool(cache_size=0)
    uncached("print(3)")
    assert not uncached("print(3)").cached


def test_concurrent_calls_are_independent(require_sandbox: None) -> None:
    tool = make_tool(timeout_s=5.0)
    results: dict[int, str] = {}

    def call(i: int) -> None:
        results[i] = tool(f"import os\nprint({i}, sorted(os.listdir('.')))").text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert results == {i: f"{i} ['main.py']\n" for i in range(3)}


def test_refuses_when_isolation_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="unshare"):
        PythonTool()
    assert not PythonTool.available()
    monkeypatch.undo()
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="root"):
        PythonTool(isolation="namespaces")
    with pytest.raises(ValueError, match="isolation"):
        PythonTool(isolation="chroot")


def test_isolation_none_is_an_explicit_trusted_opt_in() -> None:
    with pytest.warns(RuntimeWarning, match="WITHOUT any sandbox"):
        tool = PythonTool(isolation="none", timeout_s=TIMEOUT_S)
    out = tool("print('trusted')")
    assert out.ok and out.text == "trusted\n"
    start = time.monotonic()
    assert tool("while True:\n    pass\n").error == "timeout"
    assert time.monotonic() - start < TIMEOUT_S + GRACE_S


def test_strip_code_fences() -> None:
    assert python_tool.strip_code_fences("print(1)") == "print(1)"
    assert python_tool.strip_code_fences("```py\nprint(1)\n```\n") == "print(1)\n"
