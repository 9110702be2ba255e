"""Whole-sandbox memory limits: one memory cgroup per run, where this machine allows one.

``MemoryCgroups.find()`` locates the memory controller this process sits in (cgroup v2's
unified hierarchy, or cgroup v1's ``memory`` hierarchy), picks where run cgroups go (under
this process's cgroup on v1 and at the v2 root; on v2 elsewhere, beside it under a delegated
parent that enables the memory controller for its children) and checks, by creating and
removing a probe, that palaestra may create cgroups there and set their limit. Each run then
gets its own cgroup (``create``): the run's first process joins it before it executes anything
(``join_argv``), so every process of the run, every tmpfs or shared-memory page it writes and
the kernel memory it makes the kernel hold are charged to that one cgroup. Past the limit the
kernel reclaims and then OOM-kills processes of that run only, with ``SIGKILL``;
``oom_kills()`` says how many it killed, so the result can say "memory limit".

Where no cgroup is writable (an unprivileged user without a delegated cgroup, a cgroup v2
whose memory controller cannot be enabled for children, a read-only ``/sys/fs/cgroup``) ``find`` raises
``CgroupUnavailable`` saying why, and the backend falls back to per-process rlimits (its
docstring says exactly what then holds).

What this module does not do: limit CPU or processes (rlimits and namespaces do that),
delegate cgroups (``systemd-run -p Delegate=yes``, or running as root, gives a writable
one), or move this process between cgroups.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass

REMOVE_WAIT_S = 2.0
"""How long ``remove`` waits for a run's last processes to leave its cgroup (the kernel tears
a PID namespace down asynchronously) before leaving it to ``sweep``."""
PREFIX = "palaestra-sandbox-"
"""The name prefix of the cgroups this module creates."""


class CgroupUnavailable(Exception):
    """No memory cgroup can be created here; the message says why."""


@dataclass(frozen=True)
class RunCgroup:
    """The memory cgroup of one run."""

    path: str
    """Its directory in the cgroup filesystem."""
    version: int
    """1 or 2: which cgroup interface the files follow."""
    shell: str
    """A POSIX shell, which joins the cgroup and then executes the command."""

    def join_argv(self) -> list[str]:
        """A prefix for a command's argv that moves it into this cgroup, then executes it. A
        command that cannot join fails to start (its stderr says why); it never runs outside."""
        procs = os.path.join(self.path, "cgroup.procs")
        return [self.shell, "-c", 'echo $$ > "$0" && exec "$@"', procs]

    def oom_kills(self) -> int:
        """How many processes of the run the kernel killed for the memory limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.path, name)) as handle:
                lines = [line.split() for line in handle]
        except OSError:
            return 0
        return next((int(words[1]) for words in lines if words[:1] == ["oom_kill"]), 0)

    def try_remove(self) -> bool:
        """Remove the cgroup; False while processes are still leaving it."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    async def remove(self) -> bool:
        """Remove the cgroup once the run's processes are gone (at most ``REMOVE_WAIT_S``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REMOVE_WAIT_S
        while not self.try_remove():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True


class MemoryCgroups:
    """Creates one memory cgroup per run under a parent this process may write to."""

    def __init__(self, parent: str, version: int) -> None:
        self.parent = parent
        self.version = version
        self.shell = shutil.which("sh") or "/bin/sh"
        """Cgroups of finished runs that still held a process; ``sweep`` removes them."""

    @classmethod
    def find(cls) -> MemoryCgroups:
        """The memory cgroups of this process, checked writable; ``CgroupUnavailable`` if not."""
        own, version = _own_memory_cgroup()
        parent = own if version == 1 else _v2_parent(own)
        cgroups = cls(parent, version)
        try:
            probe = cgroups.create(64 << 20)
        except OSError as error:
            raise CgroupUnavailable(f"cannot create a memory cgroup in {parent}: {error}") from None
        probe.try_remove()
        return cgroups

    def create(self, limit_bytes: int) -> RunCgroup:
        """A new cgroup whose processes may use at most ``limit_bytes`` of memory, no swap."""
        self.sweep()
        path = os.path.join(self.parent, PREFIX + uuid.uuid4().hex[:12])
        cgroup = RunCgroup(path, self.version, self.shell)
        os.mkdir(cgroup.path)
        try:
            if self.version == 2:
                _write(cgroup.path, "memory.max", limit_bytes)
                _write(cgroup.path, "memory.swap.max", 0, optional=True)
            else:
                _write(cgroup.path, "memory.limit_in_bytes", limit_bytes)
                _write(cgroup.path, "memory.memsw.limit_in_bytes", limit_bytes, optional=True)
        except OSError:
            cgroup.try_remove()
            raise
        return cgroup

    def forget(self, cgroup: RunCgroup) -> None:
        """Remove ``cgroup`` later (at the next ``create``, ``sweep`` or at exit): some
        process of it has not exited yet."""
        with _LEFTOVER_LOCK:
            LEFTOVER.append(cgroup)

    def sweep(self) -> None:
        """Remove the cgroups left by earlier runs whose processes have now gone."""
        _sweep()


LEFTOVER: list[RunCgroup] = []
"""Cgroups of finished runs, from every sandbox of this process, that still held a process
when their run ended; removed as soon as they are empty."""
_LEFTOVER_LOCK = threading.Lock()


def _sweep() -> None:
    with _LEFTOVER_LOCK:
        LEFTOVER[:] = [cgroup for cgroup in LEFTOVER if not cgroup.try_remove()]


@atexit.register
def _sweep_at_exit() -> None:
    """Remove what is left at interpreter exit, giving killed processes a moment to go."""
    deadline = time.monotonic() + REMOVE_WAIT_S
    _sweep()
    while LEFTOVER and time.monotonic() < deadline:
        time.sleep(0.01)
        _sweep()


def _own_memory_cgroup() -> tuple[str, int]:
    """The directory of this process's memory cgroup, and the interface version (1 or 2)."""
    v1_path = v2_path = None
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                v2_path = path
            elif "memory" in controllers.split(","):
                v1_path = path
    mounts = _cgroup_mounts()
    if v1_path is not None and "memory" in mounts:
        return _join(mounts["memory"], v1_path), 1
    if v2_path is not None and "" in mounts:
        directory = _join(mounts[""], v2_path)
        if "memory" in _read(directory, "cgroup.controllers").split():
            return directory, 2
    raise CgroupUnavailable("no memory cgroup controller is mounted for this process.")


def _cgroup_mounts() -> dict[str, str]:
    """Mount points of the cgroup filesystems: "" for cgroup v2, "memory" for v1's memory
    hierarchy."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3].split(",")
            if fstype == "cgroup2":
                mounts.setdefault("", fields[4])
            elif fstype == "cgroup" and "memory" in options:
                mounts.setdefault("memory", fields[4])
    return mounts


def _v2_parent(own: str) -> str:
    """Where run cgroups go on cgroup v2: under this process's cgroup where the memory
    controller is (or can be) enabled for its children, which v2 allows only for the root
    cgroup, since a cgroup holding processes cannot enable it; else beside it, under its
    parent, where a delegated parent has enabled it (the process then sits in a leaf)."""
    for directory in (own, os.path.dirname(own)):
        try:
            if "memory" in _read(directory, "cgroup.subtree_control").split():
                return directory
        except CgroupUnavailable:  # above the cgroup filesystem's root
            continue
    try:
        _write(own, "cgroup.subtree_control", "+memory")
    except OSError as error:
        raise CgroupUnavailable(
            f"cannot enable the memory controller for children of {own} ({error}): cgroup v2 "
            "refuses it while that cgroup holds processes. Run palaestra in a leaf of a "
            "delegated cgroup whose memory controller is enabled for its children (e.g. "
            "systemd-run --scope -p Delegate=yes, then move palaestra into a child of the "
            "scope and write +memory to the scope's cgroup.subtree_control)."
        ) from None
    return own


def _join(mount: str, path: str) -> str:
    return os.path.join(mount, path.lstrip("/")).rstrip("/") or "/"


def _read(directory: str, name: str) -> str:
    try:
        with open(os.path.join(directory, name)) as handle:
            return handle.read()
    except OSError as error:
        raise CgroupUnavailable(f"cannot read {name} in {directory}: {error}") from None


def _write(directory: str, name: str, value: object, *, optional: bool = False) -> None:
    path = os.path.join(directory, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as handle:
        handle.write(str(value))
