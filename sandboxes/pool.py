"""``SandboxPool``: a fixed number of sandboxes shared by any number of concurrent callers.

Hundreds of concurrent episodes may each want to run code; the machine has a few cores. A
pool of ``size`` sandboxes runs at most ``size`` commands at once, and callers beyond that
wait in FIFO order for a free one. The pool is itself a ``Sandbox``, so envs take either.

The pool works across event loops and threads: a code env's synchronous ``step`` runs its
own short event loop, while the rollout's ``astep`` calls share the rollout's loop, and both
may use one process-wide pool. A waiter whose task is cancelled gives up its place (and a
sandbox handed to it at that moment goes to the next waiter).

``make_sandbox(backend, ...)`` builds one sandbox of a named backend.

What this module does not do: retry failed runs (an infrastructure error reaches the
caller), or balance load across machines (spread envs over nodes with Ray for that).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from palaestra.sandboxes.core import ExecResult, Files, Limits, Sandbox
from palaestra.sandboxes.errors import SandboxConfigError

BACKENDS = ("bubblewrap", "docker", "local")
"""The backend names ``make_sandbox`` knows."""


class SandboxPool:
    """At most ``size`` concurrent runs over ``size`` sandboxes made by ``make``."""

    def __init__(self, make: Callable[[], Sandbox], size: int) -> None:
        if size < 1:
            raise SandboxConfigError(f"a SandboxPool needs size >= 1, got {size}.")
        self.sandboxes = [make() for _ in range(size)]
        self.python = self.sandboxes[0].python
        self._free: deque[Sandbox] = deque(self.sandboxes)
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[Sandbox]]] = deque()
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """How many runs may go on at once."""
        return len(self.sandboxes)

    @property
    def idle(self) -> int:
        """Sandboxes free right now."""
        with self._lock:
            return len(self._free)

    async def run(
        self,
        command: Sequence[str],
        *,
        files: Files | None = None,
        stdin: str | bytes = b"",
        limits: Limits | None = None,
    ) -> ExecResult:
        """Wait for a free sandbox and run ``command`` on it; see ``Sandbox.run``."""
        sandbox = await self._acquire()
        try:
            return await sandbox.run(command, files=files, stdin=stdin, limits=limits)
        finally:
            self._release(sandbox)

    def close(self) -> None:
        """Close every sandbox of the pool. Idempotent."""
        for sandbox in self.sandboxes:
            sandbox.close()

    async def _acquire(self) -> Sandbox:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free:
                return self._free.popleft()
            waiter: asyncio.Future[Sandbox] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            with self._lock:
                if (loop, waiter) in self._waiters:
                    self._waiters.remove((loop, waiter))
            raise  # a sandbox already on its way to this waiter is passed on by _hand

    def _release(self, sandbox: Sandbox) -> None:
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._hand, waiter, sandbox)
                    return
                except RuntimeError:  # that waiter's event loop is closed
                    continue
            self._free.append(sandbox)

    def _hand(self, waiter: asyncio.Future[Sandbox], sandbox: Sandbox) -> None:
        if waiter.done():  # cancelled meanwhile: the next waiter gets it
            self._release(sandbox)
        else:
            waiter.set_result(sandbox)


def make_sandbox(backend: str, *, unsafe_local: bool = False, **options: Any) -> Sandbox:
    """One sandbox of ``backend`` (``"bubblewrap"``, ``"docker"`` or ``"local"``).

    ``options`` go to the backend's constructor (``limits``, ``python``, ``image``, ...).
    The local backend is refused unless ``unsafe_local`` is True.
    """
    if backend == "bubblewrap":
        from palaestra.sandboxes.bubblewrap import BubblewrapSandbox

        return BubblewrapSandbox(**options)
    if backend == "docker":
        from palaestra.sandboxes.docker import DockerSandbox

        return DockerSandbox(**options)
    if backend == "local":
        from palaestra.sandboxes.local import LocalSandbox

        return LocalSandbox(unsafe=unsafe_local, **options)
    raise SandboxConfigError(f"unknown sandbox backend {backend!r}; choose one of {BACKENDS}.")
