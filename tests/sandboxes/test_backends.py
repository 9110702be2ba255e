"""Backends run programs and report what they did; the sandbox's own failures are
infrastructure errors, never program results; the local backend must be opted into."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from palaestra.sandboxes import (
    Limits,
    SandboxConfigError,
    SandboxStartError,
    SandboxUnavailableError,
    make_sandbox,
    run_python,
)
from palaestra.sandboxes.bubblewrap import BubblewrapSandbox
from palaestra.sandboxes.local import LocalSandbox
from tests.sandboxes.conftest import bubblewrap_or_skip, docker_engine

__all__ = ["docker_engine"]


@pytest.fixture(params=["bubblewrap", "local"])
def sandbox(request: pytest.FixtureRequest):
    if request.param == "local":
        return make_sandbox("local", unsafe_local=True)
    return bubblewrap_or_skip()


async def test_runs_a_program_with_files_and_stdin(sandbox) -> None:
    code = "import sys\nprint(open('data/in.txt').read(), sys.stdin.read().upper())\n"

    result = await run_python(sandbox, code, files={"data/in.txt": "file"}, stdin="piped")

    assert result.ok and result.stdout == "file PIPED\n" and result.stderr == ""
    assert result.wall_time_s > 0 and result.cpu_time_s > 0


async def test_reports_exit_codes_and_stderr(sandbox) -> None:
    result = await run_python(sandbox, "import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)")

    assert result.exit_code == 3 and not result.ok and result.stderr == "oops\n"


async def test_wall_time_limit(sandbox) -> None:
    result = await run_python(sandbox, "import time\ntime.sleep(60)", limits=Limits(wall_time_s=1))

    assert result.timed_out and result.exit_code == -9 and result.wall_time_s < 6


async def test_output_cap(sandbox) -> None:
    limits = Limits(max_output_bytes=1000)

    result = await run_python(sandbox, "print('x' * 5000)", limits=limits)

    assert result.truncated and result.stdout == "x" * 1000


async def test_bad_file_paths_are_refused(sandbox) -> None:
    for path in ("../escape.py", "/abs.py", "a/../b.py", ""):
        with pytest.raises(SandboxConfigError, match="relative"):
            await sandbox.run(["true"], files={path: "x"})


def test_local_backend_is_refused_without_opt_in() -> None:
    with pytest.raises(SandboxConfigError, match="unisolated"):
        make_sandbox("local")
    with pytest.raises(SandboxConfigError, match="unisolated"):
        LocalSandbox()


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(SandboxConfigError, match="bubblewrap"):
        make_sandbox("chroot")


def test_missing_bubblewrap_is_unavailable() -> None:
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        BubblewrapSandbox(bwrap="/nonexistent/bwrap")


async def test_a_sandbox_that_cannot_start_is_an_infrastructure_error() -> None:
    bubblewrap_or_skip()
    broken = BubblewrapSandbox(python="/nonexistent/prefix/bin/python3")  # cannot be mounted

    with pytest.raises(SandboxStartError, match="could not start the sandbox"):
        await run_python(broken, "print('never runs')")


async def test_a_missing_command_exits_127_like_a_shell(sandbox) -> None:
    result = await sandbox.run(["/no/such/interpreter"])

    assert result.exit_code == 127 and "failed to execute" in result.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_build_image_command_builds_a_runnable_image(docker_engine) -> None:
    from palaestra.sandboxes.docker import DockerSandbox, docker_client

    tag = "palaestra-sandbox:test-build"
    out = subprocess.run(
        [sys.executable, "-m", "palaestra", "sandbox", "build-image", "--tag", tag],
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        assert out.returncode == 0, out.stderr[-2000:]
        sandbox = DockerSandbox(image=tag)
        result = asyncio.run(run_python(sandbox, "import sys; print(sys.version_info[0])"))
        sandbox.close()
        assert result.ok and result.stdout == "3\n"
    finally:
        docker_client().images.remove(tag, force=True)
