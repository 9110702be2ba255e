"""Asynchronous rollouts: keep generating while the learner trains, within a staleness bound.

``RolloutProducer`` runs in the background and fills a bounded queue with groups of
episodes, step after step. Generating the groups of training step ``s`` waits until the
engine holds policy version ``s - 1 - max_staleness`` or newer, so the producer is never
more than ``max_staleness`` versions ahead of the learner. ``max_staleness = 0`` is the
synchronous schedule: step ``s`` is sampled on exactly the weights of step ``s - 1``.

A group's staleness when step ``s`` consumes it is ``(s - 1) - v``, where ``v`` is the
oldest policy version that sampled any of its episodes (``group_staleness``). A weight
update can land while a group is being generated, so ``next_batch`` checks every group and
drops those over the bound, taking the next group instead; the drops are counted.

Dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476): with ``DynamicSampling``, a
step's groups that its ``keep`` test rejects (groups whose rewards are all equal, which
carry no gradient) are dropped and replaced by groups of new tasks sampled at the same
gate, for at most ``max_rounds`` rounds. If the rounds run out, rejected groups fill the
step's remaining places, so every step still gets its groups; all of it is counted.

A resumed run starts the producer at its next step (``start(first_step)``) on the restored
weights: the groups a stopped run had sampled ahead but not trained are sampled again, so
every step's groups are trained exactly once.

A group whose every episode failed in the engine (the engine died; it restarts on the
next call) is sampled again with the same requests, at most ``ENGINE_RETRIES`` times and
counted, so the step still gets its groups after an engine restart.

What this module does not do: train, or choose which tasks make up a step (the caller's
``requests_for_step`` and ``DynamicSampling.more_requests`` do).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.errors import RolloutConfigError
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, RolloutLimits, generate_groups
from palaestra.agent.trajectory import StopReason, Trajectory

RequestsForStep = Callable[[int], Sequence[Sequence[EpisodeRequest]]]


def group_staleness(group: Sequence[Trajectory], step: int) -> int:
    """How many policy versions ``group`` lags behind the weights training step ``step``
    starts from (those of step ``step - 1``), counted from the oldest version that sampled
    any of its episodes; negative when the group was sampled on newer weights."""
    return (step - 1) - min(trajectory.policy_version for trajectory in group)


@dataclass(frozen=True)
class DynamicSampling:
    """Drop the groups ``keep`` rejects and sample replacements (DAPO's dynamic sampling)."""

    keep: Callable[[list[Trajectory]], bool]
    """Whether a finished group is worth training on."""
    more_requests: Callable[[int, int, int], Sequence[Sequence[EpisodeRequest]]]
    """``(step, round, n)`` -> ``n`` groups of new tasks for replacement round ``round``
    (from 1) of training step ``step``; their group ids must not repeat the step's."""
    max_rounds: int = 3
    """Replacement rounds per step before rejected groups are used to fill it."""


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
    groups_rejected: int = 0
    """Groups dynamic sampling rejected (and replaced, or used only to fill a step)."""
    replacement_rounds: int = 0
    """Rounds of replacement groups sampled by dynamic sampling."""
    rejected_groups_used: int = 0
    """Rejected groups that filled a step after its replacement rounds ran out."""
    groups_resampled_after_engine_error: int = 0
    """Groups sampled again because every episode of theirs failed in the engine."""

    def record(self) -> dict[str, Any]:
        """The counts as JSON-ready data (a training state keeps them)."""
        return dataclasses.asdict(self) | {"staleness": dict(self.staleness)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ProducerStats:
        """The counts ``record`` wrote (JSON turns the staleness keys into strings)."""
        staleness = Counter({int(k): v for k, v in record["staleness"].items()})
        return cls(**(record | {"staleness": staleness}))


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
        limits: RolloutLimits = RolloutLimits(),  # noqa: B008 (frozen, so safe to share)
        max_staleness: int = 0,
        queue_groups: int = 64,
        dynamic_sampling: DynamicSampling | None = None,
    ) -> None:
        """``limits`` bound every episode (see ``agent.rollout``); ``queue_groups`` bounds the
        queue."""
        if max_staleness < 0:
            raise RolloutConfigError(f"max_staleness must be >= 0, got {max_staleness}")
        self.pool, self.engine, self.renderer, self.sampling = pool, engine, renderer, sampling
        self.requests_for_step = requests_for_step
        self.env_id, self.limits, self.max_staleness = env_id, limits, max_staleness
        self.dynamic_sampling = dynamic_sampling
        self.stats = ProducerStats()
        self._queue: asyncio.Queue[list[Trajectory]] = asyncio.Queue(maxsize=queue_groups)
        self._version_changed = asyncio.Condition()
        self._step_done = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self, first_step: int = 1) -> None:
        """Start producing, from training step ``first_step`` on (a resumed run's next step),
        in the background on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._produce(first_step))

    def cancel(self) -> None:
        """Ask the producer to stop now (a callback may call this, e.g. on Ctrl-C): groups in
        flight are abandoned, and ``next_batch`` raises ``CancelledError``."""
        if self._task is not None:
            self._task.cancel()

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
            staleness = group_staleness(group, step)
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

    async def _produce(self, first_step: int) -> None:
        step = first_step
        while True:
            oldest_allowed = step - 1 - self.max_staleness
            async with self._version_changed:
                await self._version_changed.wait_for(
                    lambda: self.engine.policy_version >= oldest_allowed  # noqa: B023 (awaited here)
                )
            await self._produce_step(step)
            async with self._step_done:
                self.stats.steps_produced = step
                self._step_done.notify_all()
            step += 1

    async def _produce_step(self, step: int) -> None:
        """Put exactly as many groups on the queue as ``requests_for_step(step)`` asks for."""
        requests = self.requests_for_step(step)
        wanted, kept, rejected = len(requests), 0, list[list[Trajectory]]()
        rounds = 0
        while True:
            async for group in self._generate_surviving_engine_deaths(requests):
                if self.dynamic_sampling is None or self.dynamic_sampling.keep(group):
                    await self._put(group)
                    kept += 1
                else:
                    self.stats.groups_rejected += 1
                    rejected.append(group)
            ds = self.dynamic_sampling
            if ds is None or kept >= wanted or rounds >= ds.max_rounds:
                break
            rounds += 1
            self.stats.replacement_rounds += 1
            requests = ds.more_requests(step, rounds, wanted - kept)
        for group in rejected[: max(wanted - kept, 0)]:  # out of rounds: fill the step
            await self._put(group)
            self.stats.rejected_groups_used += 1

    async def _generate_surviving_engine_deaths(
        self, requests: Sequence[Sequence[EpisodeRequest]]
    ) -> AsyncIterator[list[Trajectory]]:
        """The groups of ``requests`` as they finish; a group whose every episode failed in
        the engine (it died, and restarts on the next call) is sampled again with the same
        requests, up to ``ENGINE_RETRIES`` times, so an engine restart costs the step no
        groups. After that the group is passed on (its episodes are infrastructure
        failures, kept out of the gradient)."""
        for attempt in range(ENGINE_RETRIES + 1):
            by_id = {group[0].group_id: group for group in requests}
            failed: list[Sequence[EpisodeRequest]] = []
            async for group in self._generate(requests):
                if attempt < ENGINE_RETRIES and _all_engine_errors(group):
                    failed.append(by_id[group[0].group_id])
                    continue
                yield group
            if not failed:
                return
            self.stats.groups_resampled_after_engine_error += len(failed)
            requests = failed

    def _generate(
        self, requests: Sequence[Sequence[EpisodeRequest]]
    ) -> AsyncIterator[list[Trajectory]]:
        return generate_groups(
            self.pool,
            self.engine,
            self.renderer,
            self.sampling,
            requests,
            env_id=self.env_id,
            limits=self.limits,
        )

    async def _put(self, group: list[Trajectory]) -> None:
        await self._queue.put(group)
        self.stats.groups_produced += 1


ENGINE_RETRIES = 2
"""Times a group whose every episode failed in the engine is sampled again."""


def _all_engine_errors(group: Sequence[Trajectory]) -> bool:
    return all(tr.stop_reason is StopReason.ENGINE_ERROR for tr in group)
