"""The per-run memory cgroup, on this machine's real cgroup filesystem: a process that joins
it is held to its limit and counted when killed, and the cgroup goes away after the run.
Skipped, with the reason, where this machine gives palaestra no writable memory cgroup."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from palaestra.sandboxes.cgroup import LEFTOVER, CgroupUnavailable, MemoryCgroups, RunCgroup

MiB = 1 << 20


@pytest.fixture
def cgroups() -> MemoryCgroups:
    try:
        return MemoryCgroups.find()
    except CgroupUnavailable as error:
        pytest.skip(f"no writable memory cgroup here: {error}")


async def test_a_process_in_the_cgroup_is_held_to_its_limit_and_counted(
    cgroups: MemoryCgroups,
) -> None:
    cgroup = cgroups.create(64 * MiB)
    grow = "block = bytearray(256 << 20)\nfor i in range(0, len(block), 4096):\n    block[i] = 1"

    done = subprocess.run([*cgroup.join_argv(), sys.executable, "-c", grow], check=False)

    assert done.returncode == -9 and cgroup.oom_kills() == 1
    assert await cgroup.remove()


async def test_a_cgroup_that_cannot_be_removed_yet_is_swept_later(
    cgroups: MemoryCgroups,
) -> None:
    cgroup = cgroups.create(64 * MiB)
    sleeper = subprocess.Popen([*cgroup.join_argv(), "sleep", "60"])
    try:
        while not Path(cgroup.path, "cgroup.procs").read_text().strip():
            await asyncio.sleep(0.01)  # the shell has not joined yet
        assert not cgroup.try_remove()
        cgroups.forget(cgroup)
    finally:
        sleeper.kill()
        sleeper.wait()

    for _ in range(200):  # the kernel moves an exited process out asynchronously
        cgroups.sweep()
        if cgroup not in LEFTOVER:
            break
        await asyncio.sleep(0.01)
    assert cgroup not in LEFTOVER and not Path(cgroup.path).exists()


def test_joining_fails_loudly_rather_than_running_outside() -> None:
    missing = RunCgroup("/sys/fs/cgroup/no-such-cgroup", version=1, shell="/bin/sh")

    done = subprocess.run(
        [*missing.join_argv(), "echo", "ran"], capture_output=True, text=True, check=False
    )

    assert done.returncode != 0 and "ran" not in done.stdout
