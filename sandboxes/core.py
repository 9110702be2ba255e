"""The sandbox contract: ``Limits`` in, ``ExecResult`` out, through the ``Sandbox`` protocol.

A ``Sandbox`` runs one command at a time in a fresh, private work directory::

    result = await sandbox.run([sandbox.python, "main.py"], files={"main.py": code})
    result.exit_code, result.stdout, result.timed_out, result.cpu_time_s

- ``files`` are written into the work directory (the command's current directory) before
  the command starts; nothing written there outlives the run.
- ``stdin`` is fed to the command.
- ``limits`` bound the run (``Limits`` documents each one); a program that hits a limit is
  stopped and its ``ExecResult`` says which (``timed_out``, ``truncated``, and ``killed_by``:
  the signal and the limit that sent it, so a grader tells a limit from a crash).

A program's failure is a result, never an exception. ``run`` raises only
``SandboxInfraError`` (the sandbox itself failed) and ``SandboxConfigError``.

Backends: ``bubblewrap`` (Linux namespaces, the default), ``docker`` (containers from a
local image) and ``local`` (no isolation; refused unless opted into). ``SandboxPool`` shares
a fixed number of sandboxes among any number of concurrent callers.

What this module does not do: pick a backend (see ``make_sandbox``) or judge programs.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from palaestra.sandboxes.errors import SandboxConfigError

MiB = 1 << 20
CPU_LIMIT_SEEN = 0.9
"""A SIGKILL no other limit explains is put down to ``cpu_time_s`` when the run used at
least this fraction of it: the kernel enforces ``RLIMIT_CPU`` on its own clock ticks, and
the CPU time the run reports may fall a little short of the limit."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. Every limit applies to the whole run unless it says
    "per process"."""

    wall_time_s: float = 10.0
    """Wall-clock seconds before the run is killed (``ExecResult.timed_out``)."""
    cpu_time_s: int = 10
    """CPU seconds per process (``RLIMIT_CPU``); a process past it is killed by SIGKILL."""
    memory_bytes: int = 1024 * MiB
    """Address space per process (``RLIMIT_AS``; allocations past it fail, ``MemoryError`` in
    Python), and the whole sandbox's memory where a cgroup holds it: always on docker, on
    bubblewrap where this machine lets palaestra create memory cgroups (see its module
    docstring for the fallback). Past the whole-sandbox limit the kernel kills a process of
    the run with SIGKILL (``killed_by`` says "memory limit"); tmpfs and shared memory count."""
    max_processes: int = 64
    """Processes and threads that may exist at once in the sandbox (fork bombs stop here)."""
    max_file_bytes: int = 16 * MiB
    """Largest file a process may write (``RLIMIT_FSIZE``); past it writes fail (``EFBIG``,
    or the SIGXFSZ signal where it is not ignored; Python ignores it)."""
    disk_bytes: int = 64 * MiB
    """Capacity of each writable directory (the work directory, ``/tmp`` and ``/dev/shm``)."""
    max_output_bytes: int = 1 * MiB
    """Bytes kept of stdout and of stderr each. A program that writes more is stopped and
    its result is marked ``truncated``."""

    def __post_init__(self) -> None:
        if self.wall_time_s <= 0 or self.cpu_time_s < 1:
            raise SandboxConfigError(
                f"wall_time_s must be > 0 and cpu_time_s >= 1, got {self.wall_time_s} and "
                f"{self.cpu_time_s}."
            )
        sizes = {
            "memory_bytes": self.memory_bytes,
            "max_processes": self.max_processes,
            "max_file_bytes": self.max_file_bytes,
            "disk_bytes": self.disk_bytes,
            "max_output_bytes": self.max_output_bytes,
        }
        bad = {name: value for name, value in sizes.items() if value < 1}
        if bad:
            raise SandboxConfigError(f"limits must be positive, got {bad}.")


@dataclass(frozen=True)
class ExecResult:
    """What one run did."""

    exit_code: int
    """The command's exit status; ``-N`` when it was killed by signal N (``-9`` when the
    sandbox stopped it for a limit); 127 when the command could not be executed."""
    stdout: str
    """Standard output, decoded as UTF-8 (undecodable bytes replaced), at most
    ``max_output_bytes`` bytes of it."""
    stderr: str
    """Standard error, like ``stdout``."""
    timed_out: bool
    """The run was killed at ``wall_time_s``."""
    truncated: bool
    """Output past ``max_output_bytes`` was dropped and the run was stopped."""
    wall_time_s: float
    """Wall-clock seconds from start to exit, sandbox start-up included."""
    cpu_time_s: float
    """User + system CPU seconds of the sandbox's processes that exited before it ended
    (processes killed with the sandbox are not counted)."""
    killed_by: str | None = None
    """The signal that ended the command and, where a limit sent it, which one:
    ``"SIGKILL (wall time limit)"``, ``"SIGKILL (output limit)"``, ``"SIGKILL (memory
    limit)"``, ``"SIGXCPU (CPU time limit)"``, ``"SIGXFSZ (file size limit)"``, or the bare
    name (``"SIGSEGV"``) when the program died on its own. None when it exited, unless the
    memory limit killed one of its processes: then ``"SIGKILL (memory limit)"`` whatever the
    command did next, so a grader sees that the run hit the limit."""

    @property
    def ok(self) -> bool:
        """The command exited with status 0 within its limits."""
        return self.exit_code == 0 and not self.timed_out and not self.truncated


def with_killed_by(result: ExecResult, limits: Limits, *, memory_limit_hit: bool) -> ExecResult:
    """``result`` with ``killed_by`` filled in from its exit status and the limits it hit;
    ``memory_limit_hit``: the sandbox's cgroup OOM-killed a process of the run."""
    if result.exit_code >= 0:
        return replace(result, killed_by="SIGKILL (memory limit)") if memory_limit_hit else result
    number = -result.exit_code
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    reason = _kill_reason(number, result, limits, memory_limit_hit)
    return replace(result, killed_by=f"{name} ({reason})" if reason else name)


def _kill_reason(
    number: int, result: ExecResult, limits: Limits, memory_limit_hit: bool
) -> str | None:
    """Which limit sent signal ``number``, if one did."""
    if result.timed_out:
        return "wall time limit"
    if result.truncated:
        return "output limit"
    if number == signal.SIGXCPU:
        return "CPU time limit"
    if number == signal.SIGXFSZ:
        return "file size limit"
    if number == signal.SIGKILL and memory_limit_hit:
        return "memory limit"
    if number == signal.SIGKILL and result.cpu_time_s >= CPU_LIMIT_SEEN * limits.cpu_time_s:
        return "CPU time limit"  # the hard RLIMIT_CPU sends SIGKILL
    return None


Files = Mapping[str, "str | bytes"]
"""Files to write into the work directory: relative path -> text (UTF-8) or bytes."""


@runtime_checkable
class Sandbox(Protocol):
    """Runs commands in isolation; see the module docstring."""

    python: str
    """The path of a Python 3 interpreter inside the sandbox (stdlib only)."""

    async def run(
        self,
        command: Sequence[str],
        *,
        files: Files | None = None,
        stdin: str | bytes = b"",
        limits: Limits | None = None,
    ) -> ExecResult:
        """Run ``command`` (an argv list) in a fresh work directory holding ``files``."""
        ...

    def close(self) -> None:
        """Release what the sandbox holds (containers, processes). Idempotent."""
        ...


def check_files(files: Files | None) -> dict[str, bytes]:
    """``files`` as bytes, keyed by validated relative paths (no ``..``, not absolute)."""
    checked: dict[str, bytes] = {}
    for path, content in (files or {}).items():
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise SandboxConfigError(
                f"file path {path!r} must be relative, without '.', '..' or empty parts "
                "(e.g. 'main.py' or 'pkg/mod.py')."
            )
        checked[path] = content.encode() if isinstance(content, str) else bytes(content)
    return checked


async def run_python(
    sandbox: Sandbox,
    code: str,
    *,
    files: Files | None = None,
    stdin: str | bytes = b"",
    limits: Limits | None = None,
) -> ExecResult:
    """Run ``code`` as ``main.py`` with the sandbox's Python, beside ``files``."""
    return await sandbox.run(
        [sandbox.python, "main.py"],
        files={**(files or {}), "main.py": code},
        stdin=stdin,
        limits=limits,
    )
