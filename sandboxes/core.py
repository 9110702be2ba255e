"""The sandbox contract: ``Limits`` in, ``ExecResult`` out, through the ``Sandbox`` protocol.

A ``Sandbox`` runs one command at a time in a fresh, private work directory::

    result = await sandbox.run([sandbox.python, "main.py"], files={"main.py": code})
    result.exit_code, result.stdout, result.timed_out, result.cpu_time_s

- ``files`` are written into the work directory (the command's current directory) before
  the command starts; nothing written there outlives the run.
- ``stdin`` is fed to the command.
- ``limits`` bound the run (``Limits`` documents each one); a program that hits a limit is
  stopped and its ``ExecResult`` says which (``timed_out``, ``truncated``, a signal exit).

A program's failure is a result, never an exception. ``run`` raises only
``SandboxInfraError`` (the sandbox itself failed) and ``SandboxConfigError``.

Backends: ``bubblewrap`` (Linux namespaces, the default), ``docker`` (containers from a
local image) and ``local`` (no isolation; refused unless opted into). ``SandboxPool`` shares
a fixed number of sandboxes among any number of concurrent callers.

What this module does not do: pick a backend (see ``make_sandbox``) or judge programs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from palaestra.sandboxes.errors import SandboxConfigError

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. Every limit applies to the whole run unless it says
    "per process"."""

    wall_time_s: float = 10.0
    """Wall-clock seconds before the run is killed (``ExecResult.timed_out``)."""
    cpu_time_s: int = 10
    """CPU seconds per process (``RLIMIT_CPU``); a process past it is killed by SIGKILL."""
    memory_bytes: int = 1024 * MiB
    """Address space per process (``RLIMIT_AS``) on bubblewrap and local; the container's
    total memory on docker. Allocations past it fail (``MemoryError`` in Python)."""
    max_processes: int = 64
    """Processes and threads that may exist at once in the sandbox (fork bombs stop here)."""
    max_file_bytes: int = 16 * MiB
    """Largest file a process may write (``RLIMIT_FSIZE``); past it writes fail (``EFBIG``,
    or the SIGXFSZ signal where it is not ignored; Python ignores it)."""
    disk_bytes: int = 64 * MiB
    """Capacity of each writable directory (the work directory and ``/tmp``)."""
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

    @property
    def ok(self) -> bool:
        """The command exited with status 0 within its limits."""
        return self.exit_code == 0 and not self.timed_out and not self.truncated


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
