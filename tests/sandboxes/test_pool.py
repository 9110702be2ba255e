"""SandboxPool: a fixed number of real sandboxes shared by many concurrent callers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from palaestra.sandboxes import (
    ExecResult,
    Limits,
    Sandbox,
    SandboxConfigError,
    SandboxPool,
    run_python,
)
from tests.sandboxes.conftest import bubblewrap_or_skip


class Counting:
    """A real sandbox that records how many of its kind run at once."""

    active = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, inner: Sandbox) -> None:
        self.inner = inner
        self.python = inner.python

    async def run(self, command: Sequence[str], **kwargs: Any) -> ExecResult:
        with Counting.lock:
            Counting.active += 1
            Counting.most = max(Counting.most, Counting.active)
        try:
            return await self.inner.run(command, **kwargs)
        finally:
            with Counting.lock:
                Counting.active -= 1

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def counting_pool() -> SandboxPool:
    inner = bubblewrap_or_skip()
    Counting.active = Counting.most = 0
    return SandboxPool(lambda: Counting(inner), size=3)


async def test_many_callers_share_a_fixed_number_of_sandboxes(counting_pool: SandboxPool) -> None:
    results = await asyncio.gather(
        *(run_python(counting_pool, f"print({i} * {i})") for i in range(24))
    )

    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(24)]
    assert Counting.most == 3 and counting_pool.idle == 3


def test_pool_is_shared_across_threads_and_event_loops(counting_pool: SandboxPool) -> None:
    outputs: list[str] = []

    def worker(n: int) -> None:
        async def play() -> list[str]:
            runs = [run_python(counting_pool, f"print({n})") for _ in range(4)]
            return [r.stdout for r in await asyncio.gather(*runs)]

        outputs.extend(asyncio.run(play()))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outputs) == sorted(f"{n}\n" for n in range(4) for _ in range(4))
    assert Counting.most <= 3 and counting_pool.idle == 3


async def test_a_cancelled_waiter_loses_no_sandbox(counting_pool: SandboxPool) -> None:
    slow = Limits(wall_time_s=1)
    holders = [
        asyncio.ensure_future(run_python(counting_pool, "import time; time.sleep(5)", limits=slow))
        for _ in range(3)
    ]
    waiter = asyncio.ensure_future(run_python(counting_pool, "print('never')"))
    await asyncio.sleep(0)  # let every task queue up; the waiter finds no free sandbox

    waiter.cancel()
    held = await asyncio.gather(*holders)
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert all(r.timed_out for r in held)
    assert counting_pool.idle == 3
    assert (await run_python(counting_pool, "print('after')")).stdout == "after\n"


def test_pool_size_must_be_positive() -> None:
    with pytest.raises(SandboxConfigError, match="size >= 1"):
        SandboxPool(bubblewrap_or_skip, size=0)
