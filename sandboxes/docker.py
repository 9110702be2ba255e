"""The ``docker`` backend: a warm pool of locked-down containers from a locally built image.

``DockerSandbox`` is one container, started on first use from ``IMAGE`` (build it offline
with ``palaestra sandbox build-image``: a Debian rootfs made by ``debootstrap`` with Python,
imported into Docker; no image registry is involved) and reused run after run. Put several
in a ``SandboxPool`` for a warm pool. Talks to the engine through the ``docker`` SDK.

Each container runs a reaper as PID 1 (a Python loop that collects orphans), as uid/gid
65534, with: no network (``network_mode=none``), a read-only root filesystem, ``/work``,
``/tmp`` and ``/dev/shm`` as size-capped tmpfs (``disk_bytes`` each; their pages count toward
the memory limit too), every capability dropped and ``no-new-privileges``, cgroup limits on
memory (no swap), processes and CPUs. A run is a ``docker exec`` of a small runner (as uid
65534, made non-dumpable) that writes the files into ``/work``, sets ``RLIMIT_CPU``,
``RLIMIT_AS``, ``RLIMIT_FSIZE`` and no core dumps, executes the command with the rest of
stdin, and reports its exit status, CPU time and the processes the memory limit killed.
After every run every process of the sandbox user is killed and ``/work``, ``/tmp`` and
``/dev/shm`` are emptied; if that cannot be done and checked (e.g. a fork bomb
holds every process slot), or the run was stopped at a limit or cancelled, the container is
removed (which kills everything in it) and a fresh one starts next time. So no
run sees another's files or processes. Containers are removed on ``close()``, on a cancelled
run that cannot be cleaned, and at interpreter exit; they carry the label
``palaestra.sandbox`` so ``docker rm -f $(docker ps -aq -f label=palaestra.sandbox)`` clears
any a crash left behind.

Threat model, compared with bubblewrap: the same isolation of network, files and processes,
plus a cgroup cap on the container's total memory and processes. What it does not stop:
kernel exploits (containers share the host kernel; the engine's default seccomp profile
applies where the engine has seccomp), and anyone who can talk to the Docker engine is root
on the host, so the engine's socket must not be reachable from the sandbox (it is not
mounted). Per-run limits that the container holds (``memory_bytes``, ``max_processes``,
``disk_bytes``) replace the container when they change.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import docker
import requests

from palaestra.sandboxes.core import ExecResult, Files, Limits, check_files, with_killed_by
from palaestra.sandboxes.errors import (
    SandboxError,
    SandboxStartError,
    SandboxUnavailableError,
)

IMAGE = "palaestra-sandbox:bookworm"
"""The image ``palaestra sandbox build-image`` builds and ``DockerSandbox`` runs."""
LABEL = "palaestra.sandbox"
"""The label on every container this backend starts."""
USER = "65534:65534"
PYTHON = "/usr/bin/python3"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

CLEAN = r"""
import os, shutil, signal, time

def alive(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def clean():
    try:
        os.kill(-1, signal.SIGKILL)  # every process of the sandbox user but PID 1 and this one
    except ProcessLookupError:
        pass
    deadline = time.time() + 5
    while time.time() < deadline:
        left = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]
        if not [p for p in left if alive(p)]:
            break
        time.sleep(0.01)
    else:
        return False
    try:
        for top in ("/work", "/tmp", "/dev/shm"):
            for name in os.listdir(top):
                path = os.path.join(top, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
    except OSError:
        return False
    return not any(os.listdir(top) for top in ("/work", "/tmp", "/dev/shm"))
"""
"""``clean()``: kill what a run left and empty the writable directories; False if it could
not be done and checked."""

RUNNER = (
    CLEAN
    + r"""
import base64, ctypes, json, resource
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: /proc/<runner> is closed

def oom_kills():  # processes the container's memory cgroup killed so far (v2, then v1)
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                return int(dict(line.split() for line in f if line.strip()).get("oom_kill", 0))
        except (OSError, ValueError):
            pass
    return 0

def read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            break
        data += chunk
    return data

spec = json.loads(read(int(read(16))))  # exact reads: the rest of stdin is the command's
for path, data in spec["files"].items():
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))
oom_before = oom_kills()
pid = os.fork()
if pid == 0:
    try:
        for name, value in spec["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        os.execvp(spec["command"][0], spec["command"])
    except OSError as error:
        os.write(2, ("failed to execute %s: %s\n" % (spec["command"][0], error)).encode())
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
cleaned = clean()
cpu = usage.ru_utime + usage.ru_stime
oom = oom_kills() - oom_before
os.write(2, ("\n%s %f %d %d\n" % (spec["nonce"], cpu, cleaned, oom)).encode())
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""
)
"""Runs each command inside the container, then cleans up after it (see the module
docstring). Its last line on stderr, after the run's nonce, is the CPU time, whether the
clean-up succeeded, and how many processes the memory limit killed during the run."""

REAPER = r"""
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    signal.sigwaitinfo({signal.SIGCHLD})
"""
"""The container's PID 1: reaps the orphans runs leave, so none lingers as a zombie."""

CLEANER = CLEAN + "raise SystemExit(0 if clean() else 1)\n"
"""Cleans up after a run whose runner could not (it was killed by its command)."""

TRAILER_BYTES = 64
"""Room on stderr for the runner's last line (its nonce and the CPU time)."""
KILL_S = 10.0
"""How long killing a stopped run's container may take before it is left to the engine."""
ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException, OSError)
"""What a failing engine raises (API errors, a refused or dropped connection)."""
CLEANER_LIMITS = Limits(wall_time_s=15.0)
"""Limits of the cleaner's exec; past them the container is replaced instead."""

_LIVE: weakref.WeakSet[DockerSandbox] = weakref.WeakSet()


def docker_client() -> Any:
    """A client of the local Docker engine, or ``SandboxUnavailableError`` saying why not."""
    try:
        client = docker.from_env()
        client.ping()
    except ENGINE_ERRORS as error:
        raise SandboxUnavailableError(
            f"no Docker engine answers ({error}). Install docker.io ('make setup-system') and "
            "start it ('dockerd &' as root, or 'systemctl start docker')."
        ) from error
    return client


class DockerSandbox:
    """One reusable container; see the module docstring."""

    def __init__(
        self,
        *,
        image: str = IMAGE,
        limits: Limits | None = None,
        cpus: float = 1.0,
        client: Any = None,
    ) -> None:
        """Args:
        image: the image to run (must hold ``/usr/bin/python3``).
        limits: default limits of a run.
        cpus: CPUs the container may use (a cgroup quota).
        client: a ``docker.DockerClient`` (default: the local engine).
        """
        self.client = client or docker_client()
        try:
            self.client.images.get(image)
        except ENGINE_ERRORS as error:
            raise SandboxUnavailableError(
                f"the Docker image {image!r} is not there ({error}); build it with "
                "'palaestra sandbox build-image' (as root)."
            ) from error
        self.image = image
        self.limits = limits or Limits()
        self.cpus = cpus
        self.python = PYTHON
        self._container: Any = None
        self._container_limits: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        _LIVE.add(self)

    async def run(
        self,
        command: Sequence[str],
        *,
        files: Files | None = None,
        stdin: str | bytes = b"",
        limits: Limits | None = None,
    ) -> ExecResult:
        """Run ``command`` in the container's clean ``/work``; see ``Sandbox.run``."""
        limits = limits or self.limits
        contents = check_files(files)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(
                self._run_locked, list(command), contents, data, limits, cancelled
            )
        except asyncio.CancelledError:
            cancelled.set()  # the worker kills the run and cleans up within a moment
            raise

    def close(self) -> None:
        """Remove the container. Idempotent."""
        with self._lock:
            self._remove()

    # ------------------------------------------------------------------------- internals

    def _run_locked(
        self,
        command: list[str],
        files: dict[str, bytes],
        stdin: bytes,
        limits: Limits,
        cancelled: threading.Event,
    ) -> ExecResult:
        with self._lock:
            try:
                container = self._ensure_container(limits)
                run = _Exec.of_command(self.client, container, command, files, stdin, limits)
                result = run.run(cancelled)
                if result.timed_out or result.truncated or cancelled.is_set():
                    self._remove()  # killing the container is the one sure way to stop a run
                elif not run.cleaned:
                    self._clean(container)
                return result
            except SandboxError:
                self._remove()
                raise
            except ENGINE_ERRORS as error:  # the engine failed, not the program
                self._remove()
                raise SandboxStartError(f"the Docker engine failed: {error}") from error

    def _ensure_container(self, limits: Limits) -> Any:
        wanted = (limits.memory_bytes, limits.max_processes, limits.disk_bytes)
        if self._container is not None and self._container_limits != wanted:
            self._remove()
        if self._container is None:
            tmpfs = f"size={limits.disk_bytes},uid=65534,gid=65534,mode=0700"
            self._container = self.client.containers.run(
                self.image,
                [PYTHON, "-I", "-c", REAPER],
                detach=True,
                user=USER,
                network_mode="none",
                read_only=True,
                tmpfs={"/work": tmpfs, "/tmp": tmpfs},
                shm_size=limits.disk_bytes,
                working_dir="/work",
                mem_limit=limits.memory_bytes,
                memswap_limit=limits.memory_bytes,
                pids_limit=limits.max_processes + 4,  # + the reaper, the runner, the cleaner
                nano_cpus=int(self.cpus * 1e9),
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                environment={"HOME": "/work", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
                labels={LABEL: "1"},
            )
            self._container_limits = wanted
        return self._container

    def _clean(self, container: Any) -> None:
        cleaner = _Exec(self.client, container, [PYTHON, "-I", "-c", CLEANER], b"", CLEANER_LIMITS)
        if not cleaner.run(threading.Event()).ok:  # something survived, or no slot to check
            self._remove()

    def _remove(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            # already gone, or the engine is: nothing left to release
            with contextlib.suppress(*ENGINE_ERRORS):
                container.remove(force=True)


class _Exec:
    """One ``docker exec``: stdin in, demultiplexed output out, wall-clock and output limits
    kept. Stopping one at a limit kills its container; the caller then removes it."""

    def __init__(
        self, client: Any, container: Any, argv: list[str], payload: bytes, limits: Limits
    ) -> None:
        self.client, self.container, self.argv, self.limits = client, container, argv, limits
        self.payload = payload
        self.nonce = ""
        self.cleaned = False
        """The runner reported that it cleaned up after the command."""
        self.output = {1: bytearray(), 2: bytearray()}

    @classmethod
    def of_command(
        cls,
        client: Any,
        container: Any,
        command: list[str],
        files: dict[str, bytes],
        stdin: bytes,
        limits: Limits,
    ) -> _Exec:
        """The runner's exec for ``command`` (see ``RUNNER``)."""
        nonce = os.urandom(16).hex()
        rlimits = {
            "RLIMIT_CPU": limits.cpu_time_s,
            "RLIMIT_AS": limits.memory_bytes,
            "RLIMIT_FSIZE": limits.max_file_bytes,
            "RLIMIT_CORE": 0,
        }
        encoded = {path: base64.b64encode(data).decode() for path, data in files.items()}
        # the nonce travels on stdin: a command can read its runner's argv, not its memory
        spec = {"files": encoded, "rlimits": rlimits, "command": command, "nonce": nonce}
        header = json.dumps(spec).encode()
        payload = f"{len(header):16d}".encode() + header + stdin
        runner = cls(client, container, [PYTHON, "-I", "-c", RUNNER], payload, limits)
        runner.nonce = nonce
        return runner

    def run(self, cancelled: threading.Event) -> ExecResult:
        started = time.monotonic()
        exec_id = self.client.api.exec_create(self.container.id, self.argv, stdin=True, user=USER)[
            "Id"
        ]
        sock = self.client.api.exec_start(exec_id, socket=True)._sock
        try:
            stopped = self._pump(sock, started + self.limits.wall_time_s, cancelled)
            if stopped:  # kill now, and drain: an engine stuck writing to us would not stop
                killer = threading.Thread(target=self._kill_container, daemon=True)
                killer.start()
                _drain(sock, time.monotonic() + KILL_S)
                killer.join(KILL_S)
        finally:
            sock.close()
        info = self.client.api.exec_inspect(exec_id)
        for _ in range(100):  # the stream ends as the process does; its status may lag
            if stopped or not info["Running"]:
                break
            time.sleep(0.02)
            info = self.client.api.exec_inspect(exec_id)
        stderr, cpu, self.cleaned, oom_kills = self._split_trailer(bytes(self.output[2]))
        code = info["ExitCode"] if not stopped and info["ExitCode"] is not None else 137
        result = ExecResult(
            exit_code=128 - code if code > 128 else code,
            stdout=bytes(self.output[1][: self.limits.max_output_bytes]).decode("utf-8", "replace"),
            stderr=stderr[: self.limits.max_output_bytes].decode("utf-8", "replace"),
            timed_out=stopped == "timeout",
            truncated=stopped == "overflow",
            wall_time_s=time.monotonic() - started,
            cpu_time_s=cpu,
        )
        return with_killed_by(result, self.limits, memory_limit_hit=oom_kills > 0)

    def _pump(self, sock: socket.socket, deadline: float, cancelled: threading.Event) -> str:
        """Send stdin and read frames until EOF; the reason it stopped early, or ""."""
        sock.setblocking(False)
        to_send: memoryview | None = memoryview(self.payload)
        buffer = b""
        while True:
            if cancelled.is_set():
                return "cancelled"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            writers = [sock] if to_send is not None else []
            readable, writable, _ = select.select([sock], writers, [], min(remaining, 0.2))
            if writable and to_send is not None:
                try:
                    to_send = to_send[sock.send(to_send[: 1 << 16]) :]
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    to_send = None
                if to_send is not None and not to_send:
                    sock.shutdown(socket.SHUT_WR)
                    to_send = None
            if readable:
                try:
                    chunk = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return ""
                buffer = self._frames(buffer + chunk)
                cap = self.limits.max_output_bytes
                if len(self.output[1]) > cap or len(self.output[2]) > cap + TRAILER_BYTES:
                    return "overflow"

    def _frames(self, buffer: bytes) -> bytes:
        """Move complete frames (8-byte header: stream, 0, 0, 0, big-endian size) to output."""
        while len(buffer) >= 8:
            size = int.from_bytes(buffer[4:8], "big")
            if len(buffer) < 8 + size:
                break
            if buffer[0] in (1, 2):
                self.output[buffer[0]] += buffer[8 : 8 + size]
            buffer = buffer[8 + size :]
        return buffer

    def _kill_container(self) -> None:
        with contextlib.suppress(*ENGINE_ERRORS):
            self.container.kill()

    def _split_trailer(self, stderr: bytes) -> tuple[bytes, float, bool, int]:
        """stderr without the runner's last line; the CPU time, clean-up and OOM kills it
        reports."""
        marker = f"\n{self.nonce} ".encode()
        cut = stderr.rfind(marker)
        if not self.nonce or cut < 0:
            return stderr, 0.0, False, 0
        cpu, cleaned, oom_kills = stderr[cut + len(marker) :].split()[:3]
        return stderr[:cut], float(cpu), cleaned == b"1", int(oom_kills)


def _drain(sock: socket.socket, deadline: float) -> None:
    """Read and drop what ``sock`` still delivers, until it ends or ``deadline``."""
    while time.monotonic() < deadline:
        if select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0]:
            try:
                if not sock.recv(1 << 16):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return


def _close_all() -> None:
    for sandbox in list(_LIVE):
        sandbox.close()


atexit.register(_close_all)


# --------------------------------------------------------------------------- the image


def build_image(
    tag: str = IMAGE,
    *,
    suite: str = SUITE,
    mirror: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Build the sandbox image offline: ``debootstrap`` a minimal Debian ``suite`` with
    ``python3`` from ``mirror`` (default: this machine's apt source), then import the rootfs
    into Docker as ``tag`` (user 65534, work dir ``/work``). Needs root. Returns ``tag``."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        raise SandboxUnavailableError(
            "building the sandbox image needs root and debootstrap ('make setup-system')."
        )
    client = docker_client()
    mirror = mirror or apt_mirror()
    with tempfile.TemporaryDirectory(prefix="palaestra-rootfs-") as work:
        root = os.path.join(work, "rootfs")
        log(f"debootstrap {suite} from {mirror} (a few minutes)...")
        command = [debootstrap, "--variant=minbase", "--include=python3", suite, root, mirror]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SandboxStartError(f"debootstrap failed: {done.stdout[-2000:]}{done.stderr}")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(os.path.join(root, cache), ignore_errors=True)
        archive = os.path.join(work, "rootfs.tar")
        subprocess.run(["tar", "-C", root, "-cf", archive, "."], check=True)
        repository, _, version = tag.partition(":")
        log(f"importing the rootfs as {tag}...")
        client.api.import_image_from_file(
            archive,
            repository=repository,
            tag=version or "latest",
            changes=[f"USER {USER}", "WORKDIR /work", 'CMD ["sleep", "infinity"]'],
        )
    return tag


def apt_mirror() -> str:
    """The first Debian archive URI in this machine's apt sources, else ``DEFAULT_MIRROR``."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            for word in words:
                if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                    return word
    return DEFAULT_MIRROR
