"""Asynchronous rollouts: keep generating while the learner trains, within a staleness bound.

``RolloutProducer`` runs in the background and fills a bounded queue with groups of
episodes, step after step. Generating the groups of training step ``s`` waits until the
engine holds policy version ``s - 1 - max_staleness`` or newer, so the producer is never
more than ``max_staleness`` versions ahead of the learner. ``max_staleness = 0`` is the
synchronous schedule: step ``s`` is sampled on exactly the weights of step ``s - 1``.

A group's staleness when step ``s`` consumes it is ``(s - 1) - v``, where ``v`` is the
oldest policy version that sampled any of its episodes. A weight update can land while a
group is being generated, so ``next_batch`` checks every group and drops those over the
bound, taking the next group instead; the drops are counted.

What this module does not do: train, or choose which tasks make up a step (the caller's
``requests_for_step`` does).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, generate_groups
from palaestra.agent.trajectory import Trajectory

RequestsForStep = Callable[[int], Sequence[Sequence[EpisodeRequest]]]


@dataclass
class ProducerStats:
    """Counts since the producer started."""

    groups_produced: int = 0
    """Groups put on the queue."""
    steps_produced: int = 0
    """Training steps whose groups have all been put on the queue."""
    groups_dropped_stale: int = 0
    """Groups dropped because they were older than ``max_staleness`` when consumed."""
    staleness: Counter[int] = field(default_factory=Counter)
    """How many consumed groups had each staleness (in policy versions)."""


class RolloutProducer:
    """Produces groups ahead of the learner, at most ``max_staleness`` versions ahead."""

    def __init__(
        self,
        pool: EnvPool,
        engine: Engine,
        renderer: ChatRenderer,
        sampling: SamplingParams,
        requests_for_step: RequestsForStep,
        *,
        env_id: str,
        max_turns: int = 1,
        max_total_tokens: int | None = None,
        max_episode_s: float | None = None,
        max_staleness: int = 0,
        queue_groups: int = 64,
    ) -> None:
        """``max_turns``, ``max_total_tokens`` and ``max_episode_s`` limit every episode
        (see ``agent.rollout.run_episode``); ``queue_groups`` bounds the queue."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.pool, self.engine, self.renderer, self.sampling = pool, engine, renderer, sampling
        self.requests_for_step = requests_for_step
        self.env_id, self.max_turns, self.max_staleness = env_id, max_turns, max_staleness
        self.max_total_tokens, self.max_episode_s = max_total_tokens, max_episode_s
        self.stats = ProducerStats()
        self._queue: asyncio.Queue[list[Trajectory]] = asyncio.Queue(maxsize=queue_groups)
        self._version_changed = asyncio.Condition()
        self._step_done = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start producing in the background on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._produce())

    async def stop(self) -> None:
        """Stop producing; groups in flight are abandoned."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def weights_updated(self) -> None:
        """Tell the producer the engine has new weights (call after ``update_weights``)."""
        async with self._version_changed:
            self._version_changed.notify_all()

    async def wait_produced(self, step: int) -> None:
        """Return once every group of training step ``step`` is on the queue."""
        async with self._step_done:
            await self._step_done.wait_for(lambda: self.stats.steps_produced >= step)

    async def next_batch(self, step: int, num_groups: int) -> list[list[Trajectory]]:
        """The next ``num_groups`` groups fresh enough for training step ``step``."""
        groups: list[list[Trajectory]] = []
        while len(groups) < num_groups:
            group = await self._get()
            staleness = (step - 1) - min(t.policy_version for t in group)
            if staleness > self.max_staleness:
                self.stats.groups_dropped_stale += 1
                continue
            self.stats.staleness[max(staleness, 0)] += 1
            groups.append(group)
        return groups

    async def _get(self) -> list[Trajectory]:
        """The next group on the queue; raises what stopped the producer if it stops first."""
        if self._task is None:
            raise RuntimeError("the rollout producer was not started: call start() first")
        if not self._queue.empty() or not self._task.done():
            get = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({get, self._task}, return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                return get.result()
            get.cancel()
        self._task.result()  # re-raise what stopped the producer
        raise RuntimeError("the rollout producer stopped")

    async def _produce(self) -> None:
        step = 1
        while True:
            oldest_allowed = step - 1 - self.max_staleness
            async with self._version_changed:
                await self._version_changed.wait_for(
                    lambda: self.engine.policy_version >= oldest_allowed  # noqa: B023 (awaited here)
                )
            async for group in generate_groups(
                self.pool,
                self.engine,
                self.renderer,
                self.sampling,
                self.requests_for_step(step),
                env_id=self.env_id,
                max_turns=self.max_turns,
                max_total_tokens=self.max_total_tokens,
                max_episode_s=self.max_episode_s,
            ):
                await self._queue.put(group)
                self.stats.groups_produced += 1
            async with self._step_done:
                self.stats.steps_produced = step
                self._step_done.notify_all()
            step += 1
