"""Spawn a command and supervise it from asyncio: output caps, wall-clock limit, CPU time.

``Child.spawn`` starts ``argv`` in a new session with pipes on its stdin, stdout and stderr
and every other descriptor closed except those passed on purpose (bubblewrap's status pipe
and the files' contents), so nothing of this process, or of a concurrent run, leaks in.

``Child.finish`` feeds stdin, reads stdout and stderr up to the output cap, and waits for
the exit through a pidfd, so no thread and no ``SIGCHLD`` handler is involved. When the
wall-clock limit passes or the output overflows it kills the process group (and any
process the backend registered with ``watch``), waits for them to be gone, and reaps the
child with ``wait4`` to read its CPU time. If the awaiting task is cancelled, the same kill
happens and the child is reaped in the background.

What this module does not do: isolate anything. The backends decide what ``argv`` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from palaestra.sandboxes.core import ExecResult
from palaestra.sandboxes.errors import SandboxStartError

READ_CHUNK = 1 << 16


class Child:
    """A spawned process being supervised; see the module docstring."""

    def __init__(self, pid: int, stdin_fd: int, stdout_fd: int, stderr_fd: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.started = time.monotonic()
        self._stdin_fd = stdin_fd
        self._pipes = (stdout_fd, stderr_fd)
        self._watched: list[int] = []
        self._reaped = False
        self.before_kill: Callable[[], None] | None = None
        """Called when the run is stopped before it exited (limit hit or cancelled), before
        the kill: a backend registers there, with ``watch``, processes outside the group."""

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        *,
        env: Mapping[str, str],
        cwd: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Child:
        """Start ``argv`` in a new session with only stdio and ``pass_fds`` open in it."""
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            process = subprocess.Popen(
                argv,
                stdin=stdin_r,
                stdout=out_w,
                stderr=err_w,
                env=env,
                cwd=cwd,
                pass_fds=pass_fds,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as error:
            for fd in (stdin_w, out_r, err_r):
                os.close(fd)
            raise SandboxStartError(f"could not start {argv[0]!r}: {error}") from error
        finally:
            for fd in (stdin_r, out_w, err_w):
                os.close(fd)
        # Reaped here with wait4 (for its CPU time), so the Popen object must never wait.
        process.returncode = 0
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        return cls(process.pid, stdin_w, out_r, err_r)

    def watch(self, pid: int) -> None:
        """Also kill ``pid`` when the run is stopped, and wait for it to be gone."""
        with contextlib.suppress(ProcessLookupError):
            self._watched.append(os.pidfd_open(pid))

    async def finish(
        self, stdin: bytes, *, wall_time_s: float, max_output_bytes: int
    ) -> ExecResult:
        """Feed ``stdin``, collect output, enforce the limits; the result of the run."""
        loop = asyncio.get_running_loop()
        overflow: asyncio.Future[None] = loop.create_future()
        readers = [_CappedReader(fd, max_output_bytes, overflow) for fd in self._pipes]
        _feed(self._stdin_fd, stdin)
        exited = _readable(self.pidfd)
        timed_out = truncated = False
        try:
            remaining = wall_time_s - (time.monotonic() - self.started)
            await asyncio.wait(
                {exited, overflow}, timeout=max(remaining, 0), return_when=asyncio.FIRST_COMPLETED
            )
            if not exited.done():
                truncated = overflow.done()
                timed_out = not truncated
                self._before_kill()
            self._kill()  # after a normal exit: the leftovers of the command's process group
            await asyncio.gather(exited, *(_readable(pidfd) for pidfd in self._watched))
            remaining = wall_time_s - (time.monotonic() - self.started)
            # what still holds the pipes died with the group; bounded for escaped processes
            await asyncio.wait([r.eof for r in readers], timeout=max(remaining, 0.1))
            truncated = truncated or overflow.done()
            _, status, usage = os.wait4(self.pid, 0)
            self._reaped = True
        finally:
            for fd in (self.pidfd, *self._watched):
                loop.remove_reader(fd)
            for reader in readers:
                reader.close()
            if self._reaped:
                os.close(self.pidfd)
            else:  # cancelled: stop everything now, reap when the kernel is done
                self._before_kill()
                self._kill()
                _reap_later(self.pid, self.pidfd)
            for pidfd in self._watched:
                os.close(pidfd)
        return ExecResult(
            exit_code=os.waitstatus_to_exitcode(status),
            stdout=readers[0].text(),
            stderr=readers[1].text(),
            timed_out=timed_out,
            truncated=truncated,
            wall_time_s=time.monotonic() - self.started,
            cpu_time_s=usage.ru_utime + usage.ru_stime,
        )

    def _before_kill(self) -> None:
        if self.before_kill is not None:
            self.before_kill()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pidfd in self._watched:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)


class _CappedReader:
    """Reads a non-blocking pipe into memory up to ``cap`` bytes; past it, sets ``overflow``
    and drains the rest unread."""

    def __init__(self, fd: int, cap: int, overflow: asyncio.Future[None]) -> None:
        self.fd = fd
        self.cap = cap
        self.data = bytearray()
        self.overflow = overflow
        self.loop = asyncio.get_running_loop()
        self.eof: asyncio.Future[None] = self.loop.create_future()
        self.loop.add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self.close()
            return
        room = self.cap - len(self.data)
        self.data += chunk[:room]
        if len(chunk) > room and not self.overflow.done():
            self.overflow.set_result(None)

    def close(self) -> None:
        if not self.eof.done():
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.eof.set_result(None)

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _readable(fd: int) -> asyncio.Future[None]:
    """A future done once ``fd`` is readable (a pidfd: once its process has exited). The
    caller removes the reader itself if it stops waiting before then."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        loop.remove_reader(fd)
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, ready)
    return future


def _feed(fd: int, data: bytes) -> None:
    """Write ``data`` to the pipe ``fd`` from a daemon thread, then close it. The thread ends
    when the command has read everything or is gone (``EPIPE``), whichever comes first."""
    if not data:
        os.close(fd)
        return

    def write() -> None:
        os.set_blocking(fd, True)
        with contextlib.suppress(BrokenPipeError), os.fdopen(fd, "wb") as pipe:
            pipe.write(data)

    threading.Thread(target=write, name="sandbox-stdin", daemon=True).start()


def _reap_later(pid: int, pidfd: int) -> None:
    """Reap a killed child once it exits, without blocking the event loop."""
    loop = asyncio.get_running_loop()

    def reap() -> None:
        loop.remove_reader(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(pidfd)

    loop.add_reader(pidfd, reap)
