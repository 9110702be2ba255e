"""The abuse suite: hostile programs on each isolating backend, each contained with nothing
left behind. Every case runs a real sandbox; none is simulated."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from palaestra.sandboxes import Limits, Sandbox, run_python

SLACK_S = 5.0
"""Start-up and teardown allowance on a loaded 2-core machine."""


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_no_network_egress_to_a_host_loopback_server(isolated: Sandbox) -> None:
    connections: list[bytes] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = f"""
import socket
for host in ("127.0.0.1", "localhost", "::1"):
    try:
        socket.create_connection((host, {port}), timeout=2).sendall(b"leak")
        print("connected", host)
    except OSError as error:
        print("refused", host, type(error).__name__)
"""
    async with server:
        result = await run_python(isolated, code)

    assert result.exit_code == 0, result.stderr
    assert "connected" not in result.stdout and result.stdout.count("refused") == 3
    assert connections == []


async def test_fork_bomb_is_contained_and_leaves_nothing(isolated: Sandbox) -> None:
    marker = f"bomb_{uuid.uuid4().hex}"
    code = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    limits = Limits(wall_time_s=2, max_processes=32)

    result = await isolated.run(
        [isolated.python, f"{marker}.py"], files={f"{marker}.py": code}, limits=limits
    )

    assert result.timed_out and result.wall_time_s < limits.wall_time_s + SLACK_S
    assert processes_with(marker) == []
    assert (await run_python(isolated, "print('fine')")).stdout == "fine\n"


async def test_memory_bomb_fails_inside_the_limit(isolated: Sandbox) -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"

    result = await run_python(isolated, code, limits=Limits(memory_bytes=256 << 20))

    assert result.exit_code != 0 and not result.timed_out
    assert "MemoryError" in result.stderr


async def test_disk_fill_stops_at_the_quota(isolated: Sandbox) -> None:
    code = """
import errno
for path in ("/work/fill", "/tmp/fill"):
    written = 0
    try:
        with open(path, "wb") as f:
            while written < 1 << 30:
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1 << 20
    except OSError as error:
        print(path, errno.errorcode[error.errno], written >> 20)
"""
    limits = Limits(disk_bytes=8 << 20, max_file_bytes=64 << 20)

    result = await run_python(isolated, code, limits=limits)

    lines = result.stdout.split()
    assert result.exit_code == 0, result.stderr
    assert lines[1] == "ENOSPC" and int(lines[2]) <= 8
    assert lines[4] == "ENOSPC" and int(lines[5]) <= 8


async def test_file_size_limit(isolated: Sandbox) -> None:
    code = "open('big', 'wb').write(b'x' * (4 << 20))"

    result = await run_python(isolated, code, limits=Limits(max_file_bytes=1 << 20))

    assert result.exit_code == 1 and "File too large" in result.stderr  # Python ignores SIGXFSZ


async def test_stdout_flood_is_truncated_and_stopped(isolated: Sandbox) -> None:
    limits = Limits(wall_time_s=30, max_output_bytes=64 << 10)

    result = await run_python(isolated, "while True:\n    print('x' * 4096)\n", limits=limits)

    assert result.truncated and not result.timed_out and result.exit_code == -9
    assert len(result.stdout) == 64 << 10
    assert result.wall_time_s < 10


async def test_sleep_forever_times_out(isolated: Sandbox) -> None:
    marker = f"sleeper_{uuid.uuid4().hex}"
    code = "import time\ntime.sleep(1000)\n"

    result = await isolated.run(
        [isolated.python, f"{marker}.py"],
        files={f"{marker}.py": code},
        limits=Limits(wall_time_s=1),
    )

    assert result.timed_out and result.exit_code == -9
    assert 1 <= result.wall_time_s < 1 + SLACK_S
    assert processes_with(marker) == []


async def test_busy_loop_stops_at_the_cpu_limit(isolated: Sandbox) -> None:
    result = await run_python(
        isolated, "while True:\n    pass\n", limits=Limits(cpu_time_s=1, wall_time_s=30)
    )

    assert not result.timed_out and result.exit_code in (-signal.SIGXCPU, -signal.SIGKILL)
    assert 0.5 <= result.cpu_time_s < 3  # the kernel checks RLIMIT_CPU on its ticks


async def test_cannot_write_outside_the_work_dir(isolated: Sandbox, tmp_path: Path) -> None:
    host_target = tmp_path / "planted"
    targets = ["/usr/planted", "/planted", "/etc/planted", "/proc/planted", str(host_target)]
    code = f"""
for path in {targets!r}:
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as error:
        print("denied", path, type(error).__name__)
open("/work/ok", "w").write("fine")
open("/tmp/ok", "w").write("fine")
print("work dir ok")
"""
    result = await run_python(isolated, code)

    lines = result.stdout.splitlines()
    assert all(line.startswith("denied ") for line in lines[:-1]), result.stdout
    assert len(lines) == len(targets) + 1 and lines[-1] == "work dir ok"
    assert not host_target.exists()


async def test_cannot_read_host_files(isolated: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    paths = [str(secret), "/etc/shadow", "/root/.bashrc", os.getcwd()]
    code = f"""
import os
for path in {paths!r}:
    try:
        print("read", path, open(path).read() if os.path.isfile(path) else os.listdir(path))
    except OSError as error:
        print("hidden", path, type(error).__name__)
"""
    result = await run_python(isolated, code)

    lines = result.stdout.splitlines()
    assert "host secret" not in result.stdout
    assert len(lines) == len(paths) and all(line.startswith("hidden ") for line in lines)


async def test_cannot_read_another_runs_files(isolated: Sandbox) -> None:
    secret = uuid.uuid4().hex
    holder = "import time\nopen('/tmp/secret', 'w').write(open('secret').read())\ntime.sleep(60)\n"
    snoop = f"""
import glob, time
deadline = time.time() + 2
found = set()
while time.time() < deadline:
    for path in ["/work/secret", "/tmp/secret", *glob.glob("/proc/*/root/*/secret")]:
        try:
            if "{secret}" in open(path).read():
                found.add(path)
        except OSError:
            pass
print(sorted(found))
"""
    holding = asyncio.ensure_future(
        run_python(isolated, holder, files={"secret": secret}, limits=Limits(wall_time_s=4))
    )
    during = await run_python(isolated, snoop)
    held = await holding
    after = await run_python(isolated, snoop)

    assert held.timed_out
    assert during.stdout == "[]\n" and after.stdout == "[]\n"


async def test_cannot_signal_host_processes(isolated: Sandbox) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = f"""
import os, signal
for pid in ({victim.pid}, {os.getpid()}, os.getppid(), -1):
    try:
        os.kill(pid, signal.SIGKILL)
        print("sent", pid)
    except OSError as error:
        print("refused", pid, type(error).__name__)
"""
        result = await run_python(isolated, code)

        assert f"refused {victim.pid} " in result.stdout, result.stderr
        assert f"refused {os.getpid()} " in result.stdout
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


async def test_background_processes_die_with_the_run(isolated: Sandbox) -> None:
    marker = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"
    code = f"""
import os, subprocess
subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "{marker}"])
    os._exit(0)
print("spawned")
"""
    result = await run_python(isolated, code)

    assert result.stdout == "spawned\n" and not result.timed_out
    assert processes_with(marker) == []


async def test_runs_unprivileged_with_no_inherited_descriptors(isolated: Sandbox) -> None:
    code = """
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(os.getuid(), os.getgid(), int(status["CapEff"], 16), sorted(os.listdir("/proc/self/fd")))
"""
    result = await run_python(isolated, code)

    uid, gid, caps, fds = result.stdout.split(" ", 3)
    assert uid != "0" and gid != "0" and caps == "0"
    assert fds.strip() == "['0', '1', '2', '3']"  # stdio, and the listing's own descriptor


async def test_cancelled_run_is_killed(isolated: Sandbox) -> None:
    marker = f"cancelled_{uuid.uuid4().hex}"
    running = isolated.run(
        [isolated.python, f"{marker}.py"],
        files={f"{marker}.py": "import time\ntime.sleep(1000)\n"},
        limits=Limits(wall_time_s=60),
    )

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(running, timeout=1.0)

    for _ in range(500):  # the kernel tears the namespace down asynchronously after SIGKILL
        if not processes_with(marker):
            break
        await asyncio.sleep(0.01)
    assert processes_with(marker) == []


async def test_files_a_run_leaves_do_not_reach_the_next_run(isolated: Sandbox) -> None:
    places = ["/work/left", "/tmp/left", "/dev/shm/left"]
    leave = f"for path in {places!r}:\n    open(path, 'w').write('left')\n"
    look = f"import os\nprint([path for path in {places!r} if os.path.exists(path)])\n"

    left = await run_python(isolated, leave)
    seen = await run_python(isolated, look)

    assert left.exit_code == 0, left.stderr
    assert seen.stdout == "[]\n"
