"""The ``bubblewrap`` backend: each run in fresh Linux namespaces, the default on Linux.

``BubblewrapSandbox.run`` starts Debian's ``bwrap`` (install it with ``apt-get install
bubblewrap``, or ``make setup-system``) and inside it ``prlimit``, which sets the rlimits
and executes the command. Nothing is shared between runs: each gets new namespaces and new
empty directories, and when its first process exits the kernel kills every process left in
its PID namespace.

Threat model: the command is untrusted code written by a policy that is rewarded for
passing tests, so it may try anything a Python program can do as an unprivileged user.

What it stops:

- network: a new, empty network namespace (loopback only, its own). No TCP/UDP to the host,
  its loopback services or the internet; no abstract Unix sockets of the host.
- the host's files: a new mount namespace whose root is read-only and holds only ``/usr``
  and the ``/bin``, ``/lib*`` links (read-only), the loader's cache from ``/etc``, the
  interpreter's prefix where it is outside ``/usr`` (read-only), a minimal read-only ``/dev``
  (device nodes only), a new ``/proc``, and three private tmpfs of ``disk_bytes`` each: the
  work directory ``/work``, ``/tmp`` and ``/dev/shm``. Nothing else is writable.
  Home directories, ``/etc``, ``/root``, ``/tmp`` of the host, other runs' work dirs and the
  repository are not there at all.
- other processes: a new PID namespace (the command is PID 1; the host's processes cannot
  be seen, signalled or traced), new IPC and UTS namespaces, a new session (no terminal
  injection), and a user namespace mapping the command to uid/gid 65534 with every
  capability dropped and further user namespaces disabled (bwrap >= 0.8). Started by root,
  bwrap itself runs as ``nobody`` (root would be exempt from the process limit).
- resources: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC`` (counted per sandbox, as each
  has its own user namespace), ``RLIMIT_FSIZE`` and no core dumps, set inside the sandbox;
  the tmpfs size caps disk; the supervisor caps output and wall time and kills the whole
  sandbox at either limit.
- total memory, where this machine lets palaestra create memory cgroups (root, or a
  delegated cgroup; ``sandbox.cgroups`` is set, see ``sandboxes/cgroup.py``): each run gets
  its own cgroup with ``memory_bytes`` as its limit and no swap, joined before bwrap starts.
  Every page the run makes the host hold counts: all its processes, its tmpfs files, SysV and
  POSIX shared memory, memfds, pipe and socket buffers. Past the limit the kernel kills a
  process of that run (``killed_by == "SIGKILL (memory limit)"``), never one outside it.
- leftovers: background processes, double forks and daemons die with the PID namespace when
  the command exits or is killed; ``run`` returns only once they are gone. Files vanish with
  the tmpfs.

What it does not stop:

- kernel exploits: there is no seccomp filter, so the whole system-call surface of the host
  kernel is reachable. Use a VM (or gVisor) when that matters.
- reading the host's ``/usr`` and the interpreter's prefix: installed software is visible
  (read-only), so do not keep secrets there.
- total memory, where no memory cgroup can be created (``sandbox.cgroups is None``;
  ``sandbox.no_cgroup_reason`` says why): then only rlimits hold. Process memory is at most
  ``max_processes`` x ``memory_bytes`` (``RLIMIT_AS`` per process, ``RLIMIT_NPROC``
  processes) plus 3 x ``disk_bytes`` of tmpfs; memfds add at most ``max_file_bytes`` per
  open descriptor. SysV shared-memory segments are not bounded at all: a process can create,
  fill and detach segments beyond its address space, and they live until the run ends (its
  IPC namespace dies with it, freeing them). Use root, a delegated cgroup, or the docker
  backend when one program's memory must not reach the host's.
- CPU contention and timing side channels: CPU time is limited per process, not shared
  fairly; use a ``SandboxPool`` no larger than the machine's cores.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace

from palaestra.sandboxes.cgroup import CgroupUnavailable, MemoryCgroups, RunCgroup
from palaestra.sandboxes.core import ExecResult, Files, Limits, check_files, with_killed_by
from palaestra.sandboxes.errors import SandboxStartError, SandboxUnavailableError
from palaestra.sandboxes.process import Child

WORK_DIR = "/work"
"""The work directory inside the sandbox (the command's current directory)."""
SANDBOX_UID = 65534
"""The uid and gid the command runs as inside its user namespace (``nobody``)."""
PATH = "/usr/local/bin:/usr/bin:/bin"
SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""Top-level system directories mounted read-only (or recreated as links where they are
links to ``/usr``, as on merged-/usr systems)."""
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
"""The only parts of ``/etc`` mounted: what the dynamic loader reads."""


class BubblewrapSandbox:
    """Runs commands under ``bwrap``; see the module docstring for what it isolates."""

    def __init__(
        self, *, limits: Limits | None = None, python: str | None = None, bwrap: str = "bwrap"
    ) -> None:
        """Args:
        limits: default limits of a run (``run(limits=...)`` overrides them).
        python: the interpreter commands use (``default_python()`` by default); where it
            lives outside ``/usr`` its installation prefix is mounted read-only.
        bwrap: the bubblewrap executable.
        """
        found = {name: shutil.which(name) for name in (bwrap, "prlimit", "setpriv")}
        missing = [name for name, path in found.items() if path is None]
        if missing:
            raise SandboxUnavailableError(
                f"the bubblewrap sandbox needs {', '.join(missing)}, not found on PATH. Install "
                "them with 'apt-get install bubblewrap util-linux' (or 'make setup-system' as "
                "root), or choose another backend."
            )
        self.bwrap, prlimit, setpriv = (str(found[name]) for name in (bwrap, "prlimit", "setpriv"))
        self.prlimit = os.path.realpath(prlimit)
        self.limits = limits or Limits()
        self.python = os.path.realpath(python or default_python())
        self._mounts = _read_only_mounts(self.python, [self.prlimit])
        self._extra = ["--disable-userns"] if _supports_disable_userns(self.bwrap) else []
        # Root's processes are exempt from RLIMIT_NPROC, and bwrap maps the sandbox user to the
        # caller's uid: as root, start bwrap as nobody so the process limit holds.
        self._as_user = (
            [setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--"]
            if os.geteuid() == 0
            else []
        )
        self.cgroups: MemoryCgroups | None = None
        """Where runs get a whole-sandbox memory cgroup; None on the per-process fallback."""
        self.no_cgroup_reason = ""
        """Why there is no memory cgroup ("" when there is one)."""
        try:
            self.cgroups = MemoryCgroups.find()
        except CgroupUnavailable as error:
            self.no_cgroup_reason = str(error)

    async def run(
        self,
        command: Sequence[str],
        *,
        files: Files | None = None,
        stdin: str | bytes = b"",
        limits: Limits | None = None,
    ) -> ExecResult:
        """Run ``command`` in a new sandbox; see ``Sandbox.run``."""
        limits = limits or self.limits
        contents = check_files(files)
        cgroup = self._cgroup(limits)
        try:
            result, status = await self._supervise(command, contents, stdin, limits, cgroup)
        except BaseException:  # cancelled: its processes die in the background
            if cgroup and self.cgroups and not cgroup.try_remove():
                self.cgroups.forget(cgroup)
            raise
        oom_kills = cgroup.oom_kills() if cgroup else 0
        if cgroup and self.cgroups and not await cgroup.remove():
            self.cgroups.forget(cgroup)
        if not (result.timed_out or result.truncated):  # else bwrap itself was killed
            if status.exit_code is None:
                raise SandboxStartError(
                    f"bubblewrap could not start the sandbox (exit status {result.exit_code}): "
                    f"{result.stderr.strip()[-500:]}"
                )
            code = status.exit_code
            result = replace(result, exit_code=128 - code if code > 128 else code)
        return with_killed_by(result, limits, memory_limit_hit=oom_kills > 0)

    def close(self) -> None:
        """Remove the cgroups of runs whose last processes outlived ``run`` (none usually):
        every run's sandbox is otherwise gone when ``run`` returns."""
        if self.cgroups:
            self.cgroups.sweep()

    def _cgroup(self, limits: Limits) -> RunCgroup | None:
        """A fresh memory cgroup capping this run's total memory, where cgroups are usable."""
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.create(limits.memory_bytes)
        except OSError as error:
            raise SandboxStartError(f"could not create the run's memory cgroup: {error}") from None

    async def _supervise(
        self,
        command: Sequence[str],
        contents: dict[str, bytes],
        stdin: str | bytes,
        limits: Limits,
        cgroup: RunCgroup | None,
    ) -> tuple[ExecResult, _StatusPipe]:
        """Start bwrap (inside ``cgroup``) and supervise it to the end; its result and status."""
        memfds = [_memfd(data) for data in contents.values()]
        status_r, status_w = os.pipe()
        try:
            argv = self._argv(command, dict(zip(contents, memfds, strict=True)), status_w, limits)
            if cgroup is not None:
                argv = [*cgroup.join_argv(), *argv]
            child = Child.spawn(argv, env={"PATH": PATH}, pass_fds=[status_w, *memfds])
        finally:
            for fd in (status_w, *memfds):
                os.close(fd)
        status = _StatusPipe(status_r)
        child.before_kill = lambda: status.watch_sandbox(child)
        try:
            data = stdin.encode() if isinstance(stdin, str) else stdin
            result = await child.finish(
                data, wall_time_s=limits.wall_time_s, max_output_bytes=limits.max_output_bytes
            )
        finally:
            status.close()
        return result, status

    def _argv(
        self, command: Sequence[str], files_fds: dict[str, int], status_fd: int, limits: Limits
    ) -> list[str]:
        files: list[str] = []
        for path, fd in files_fds.items():
            parent = os.path.dirname(path)
            if parent:
                files += ["--dir", f"{WORK_DIR}/{parent}"]
            files += ["--file", str(fd), f"{WORK_DIR}/{path}"]
        rlimits = [
            f"--cpu={limits.cpu_time_s}",
            f"--as={limits.memory_bytes}",
            f"--nproc={limits.max_processes}",
            f"--fsize={limits.max_file_bytes}",
            "--core=0",
        ]
        return [
            *self._as_user,
            self.bwrap,
            *("--unshare-all", "--unshare-user", *self._extra, "--cap-drop", "ALL"),
            *("--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"),
            *("--die-with-parent", "--new-session", "--as-pid-1"),
            *self._mounts,
            *("--proc", "/proc", "--dev", "/dev"),
            *("--size", str(limits.disk_bytes), "--tmpfs", "/dev/shm"),
            *("--size", str(limits.disk_bytes), "--tmpfs", "/tmp"),
            *("--size", str(limits.disk_bytes), "--tmpfs", WORK_DIR),
            *files,
            *("--remount-ro", "/dev", "--remount-ro", "/"),
            *("--chdir", WORK_DIR, "--clearenv", "--setenv", "PATH", PATH),
            *("--setenv", "HOME", WORK_DIR, "--setenv", "TMPDIR", "/tmp"),
            *("--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1"),
            *("--json-status-fd", str(status_fd), "--"),
            *(self.prlimit, *rlimits, "--", *command),
        ]


class _StatusPipe:
    """bwrap's JSON status stream: the sandbox's PID 1 as a host pid, then its exit code."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.text = ""

    def _read(self) -> None:
        while self.fd >= 0:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.text += chunk.decode()

    def _field(self, name: str) -> int | None:
        decoder, text, index = json.JSONDecoder(), self.text, 0
        while index < len(text):
            try:
                value, index = decoder.raw_decode(text, index)
            except json.JSONDecodeError:
                return None
            if name in value:
                return int(value[name])
            while index < len(text) and text[index].isspace():
                index += 1
        return None

    def watch_sandbox(self, child: Child) -> None:
        """Have ``child`` kill the sandbox's PID 1 too, and wait until its namespace is gone."""
        self._read()
        pid = self._field("child-pid")
        if pid is not None:
            child.watch(pid)

    @property
    def exit_code(self) -> int | None:
        """The command's exit status (signal deaths as 128 + N); None if it never started."""
        self._read()
        return self._field("exit-code")

    def close(self) -> None:
        self._read()
        os.close(self.fd)
        self.fd = -1


def default_python() -> str:
    """The system's ``/usr/bin/python3`` where there is one (it comes with ``/usr``), else the
    interpreter running palaestra."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("sandbox-file")  # close-on-exec: only its own run passes it on
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_only_mounts(python: str, binaries: list[str]) -> list[str]:
    """bwrap arguments mounting the system read-only, plus the prefixes of ``python`` and
    ``binaries`` where they live outside ``/usr``."""
    mounts = ["--ro-bind", "/usr", "/usr"]
    for name in SYSTEM_DIRS:
        path = f"/{name}"
        if os.path.islink(path):
            mounts += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            mounts += ["--ro-bind", path, path]
    for path in LOADER_FILES:
        mounts += ["--ro-bind-try", path, path]
    prefixes = {_install_prefix(python)} | {os.path.dirname(b) for b in binaries}
    for prefix in sorted(prefixes):
        if not any(prefix == d or prefix.startswith(d + "/") for d in ("/usr", "/bin", "/lib")):
            mounts += ["--ro-bind", prefix, prefix]
    return mounts


def _install_prefix(python: str) -> str:
    """The installation a Python binary belongs to: the parent of its ``bin`` directory."""
    bin_dir = os.path.dirname(python)
    return os.path.dirname(bin_dir) if os.path.basename(bin_dir) == "bin" else bin_dir


@functools.cache
def _supports_disable_userns(bwrap: str) -> bool:
    """Whether this bwrap has ``--disable-userns`` (0.8 and later)."""
    usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, check=False)
    return "--disable-userns" in usage.stdout + usage.stderr
