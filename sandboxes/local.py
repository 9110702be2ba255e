"""The ``local`` backend: no isolation at all, for code you trust. Refused unless opted into.

``LocalSandbox`` runs the command as the current user, in a fresh temporary directory that is
deleted afterwards, under ``prlimit`` (CPU time, address space, file size, no core dumps)
and the supervisor's wall-clock and output limits. That is all it does.

What it does not stop: anything else. The command can read and write every file this user
can (your home directory, the repository, other runs' directories), reach the network,
signal or trace this user's processes, and outlive the run by leaving its process group
(``setsid``, daemons). ``max_processes`` is not applied (``RLIMIT_NPROC`` would count every
process of the user, not just the run's) and ``disk_bytes`` is not applied (the directory
is on the host's disk). Use it to debug an environment on a machine without bubblewrap or
Docker, never for a policy's output in training.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from palaestra.sandboxes.core import ExecResult, Files, Limits, check_files, with_killed_by
from palaestra.sandboxes.errors import SandboxConfigError, SandboxUnavailableError
from palaestra.sandboxes.process import Child

PATH = "/usr/local/bin:/usr/bin:/bin"


class LocalSandbox:
    """Runs commands unisolated in a temporary directory; see the module docstring."""

    def __init__(
        self, *, unsafe: bool = False, limits: Limits | None = None, python: str | None = None
    ) -> None:
        """Args:
        unsafe: must be True: the caller accepts that the code runs with its own rights.
        limits: default limits of a run.
        python: the interpreter commands use (default: the one running palaestra).
        """
        if not unsafe:
            raise SandboxConfigError(
                "the local sandbox runs code unisolated, with your user's rights: it can read "
                "and delete your files and reach the network. Use the bubblewrap or docker "
                "backend; to run code you trust locally anyway, opt in with unsafe=True "
                "(unsafe_local: true in an env's config)."
            )
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise SandboxUnavailableError("the local sandbox needs 'prlimit' (util-linux).")
        self.prlimit = prlimit
        self.limits = limits or Limits()
        self.python = python or sys.executable

    async def run(
        self,
        command: Sequence[str],
        *,
        files: Files | None = None,
        stdin: str | bytes = b"",
        limits: Limits | None = None,
    ) -> ExecResult:
        """Run ``command`` in a new temporary directory holding ``files``."""
        limits = limits or self.limits
        contents = check_files(files)
        work_dir = tempfile.mkdtemp(prefix="palaestra-local-")
        try:
            for path, data in contents.items():
                target = os.path.join(work_dir, path)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as handle:
                    handle.write(data)
            rlimits = [
                f"--cpu={limits.cpu_time_s}",
                f"--as={limits.memory_bytes}",
                f"--fsize={limits.max_file_bytes}",
                "--core=0",
            ]
            argv = [self.prlimit, *rlimits, "--", *command]
            env = {"PATH": PATH, "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8"}
            child = Child.spawn(argv, env=env, cwd=work_dir)
            data = stdin.encode() if isinstance(stdin, str) else stdin
            result = await child.finish(
                data, wall_time_s=limits.wall_time_s, max_output_bytes=limits.max_output_bytes
            )
            return with_killed_by(result, limits, memory_limit_hit=False)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def close(self) -> None:
        """Nothing to release."""
