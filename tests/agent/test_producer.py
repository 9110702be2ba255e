"""Asynchronous rollouts: the staleness bound, dropping stale groups, and the sync schedule."""

from __future__ import annotations

import asyncio

import pytest

from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.producer import RolloutProducer, group_staleness
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, generate_groups
from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.envs import make

GROUPS, SIZE = 2, 2


def requests_for_step(step: int) -> list[list[EpisodeRequest]]:
    first = (step - 1) * GROUPS
    return [
        [EpisodeRequest(first + g, reset_seed=100 * step + g, sampling_seed=j) for j in range(SIZE)]
        for g in range(GROUPS)
    ]


@pytest.fixture
def parts(tokenizer, math_tasks):
    pool = EnvPool(lambda: make("palaestra/Math-v0", source=f"jsonl:{math_tasks}"), size=4)
    answer = [*tokenizer.encode("\\boxed{4}", add_special_tokens=False), tokenizer.eos_token_id]
    engine = FakeEngine(lambda prompt: answer)
    yield pool, engine, ChatRenderer(tokenizer)
    pool.close()


def producer(parts, max_staleness: int = 0, dynamic_sampling=None) -> RolloutProducer:
    pool, engine, renderer = parts
    return RolloutProducer(
        pool,
        engine,
        renderer,
        SamplingParams(),
        requests_for_step,
        env_id="m",
        max_staleness=max_staleness,
        dynamic_sampling=dynamic_sampling,
    )


def test_group_staleness_counts_from_the_oldest_version_in_the_group(tokenizer):
    def sampled_on(version: int) -> Trajectory:
        return Trajectory(
            (1,), (1,), (0.0,), (), 0.0, {}, StopReason.ANSWERED, version, 0, "e", "t"
        )

    group = [sampled_on(3), sampled_on(1)]
    assert group_staleness(group, step=4) == 2  # step 4 trains on version 3's weights
    assert group_staleness(group, step=2) == 0
    assert group_staleness([sampled_on(5)], step=4) == -2  # sampled ahead of the learner


async def learner_step(engine: FakeEngine, p: RolloutProducer, version: int) -> None:
    await engine.update_weights([], version=version)
    await p.weights_updated()


async def test_staleness_zero_waits_for_the_new_weights(parts):
    p = producer(parts, max_staleness=0)
    p.start()
    first = await p.next_batch(step=1, num_groups=GROUPS)
    assert {t.group_id for g in first for t in g} == {0, 1}
    with pytest.raises(TimeoutError):  # step 2 must not be sampled on version 0
        await asyncio.wait_for(p.next_batch(step=2, num_groups=1), timeout=0.5)
    await learner_step(parts[1], p, version=1)
    second = await p.next_batch(step=2, num_groups=GROUPS - 1)  # one group was taken above
    assert all(t.policy_version == 1 for g in second for t in g)
    assert p.stats.staleness == {0: 2 + 1} and p.stats.groups_dropped_stale == 0
    await p.stop()


async def test_staleness_one_samples_the_next_step_while_the_learner_trains(parts):
    p = producer(parts, max_staleness=1)
    p.start()
    await p.next_batch(step=1, num_groups=GROUPS)
    ahead = await p.next_batch(step=2, num_groups=GROUPS)  # no weight update yet
    assert all(t.policy_version == 0 for g in ahead for t in g)
    assert p.stats.staleness == {0: GROUPS, 1: GROUPS}
    await p.stop()


async def test_groups_older_than_the_bound_are_dropped_and_replaced(parts):
    engine = parts[1]
    p = producer(parts, max_staleness=1)
    p.start()
    await p.next_batch(step=1, num_groups=GROUPS)
    await p.wait_produced(2)  # step 2's groups are sampled on version 0, ahead of time
    await learner_step(engine, p, version=1)  # ...then the learner moves on twice
    await learner_step(engine, p, version=2)
    fresh = await p.next_batch(step=3, num_groups=GROUPS)
    assert p.stats.groups_dropped_stale == GROUPS  # all of step 2: (3 - 1) - 0 > 1
    assert all((3 - 1) - t.policy_version <= 1 for g in fresh for t in g)
    await p.stop()


async def test_staleness_zero_reproduces_the_synchronous_batches(parts):
    pool, engine, renderer = parts
    sync = []
    for step in (1, 2):
        groups = [
            g
            async for g in generate_groups(
                pool, engine, renderer, SamplingParams(), requests_for_step(step), env_id="m"
            )
        ]
        sync.append(sorted(groups, key=lambda g: g[0].group_id))
        await engine.update_weights([], version=step)

    engine2 = FakeEngine(engine._complete)
    p = RolloutProducer(
        pool, engine2, renderer, SamplingParams(), requests_for_step, env_id="m", max_staleness=0
    )
    p.start()
    produced = []
    for step in (1, 2):
        groups = await p.next_batch(step=step, num_groups=GROUPS)
        produced.append(sorted(groups, key=lambda g: g[0].group_id))
        await learner_step(engine2, p, version=step)
    await p.stop()
    assert [[t.token_ids for g in s for t in g] for s in produced] == [
        [t.token_ids for g in s for t in g] for s in sync
    ]
    assert [[t.policy_version for g in s for t in g] for s in produced] == [[0] * 4, [1] * 4]


async def test_a_producer_that_dies_raises_its_error_in_the_waiting_learner(parts):
    pool, engine, renderer = parts

    def broken(step: int) -> list[list[EpisodeRequest]]:
        if step == 2:
            raise ValueError("no tasks left for step 2")
        return requests_for_step(step)

    p = RolloutProducer(pool, engine, renderer, SamplingParams(), broken, env_id="m")
    p.start()
    await p.next_batch(step=1, num_groups=GROUPS)
    waiting = asyncio.create_task(p.next_batch(step=2, num_groups=GROUPS))
    await learner_step(engine, p, version=1)  # the producer moves on to step 2 and dies

    with pytest.raises(ValueError, match="no tasks left"):
        await asyncio.wait_for(waiting, timeout=5)
    await p.stop()


def backfill(step: int, round: int, n: int) -> list[list[EpisodeRequest]]:
    """Replacement groups with ids 100 * round + i, new tasks."""
    return [
        [
            EpisodeRequest(100 * round + g, reset_seed=1000 * round + g, sampling_seed=j)
            for j in range(SIZE)
        ]
        for g in range(n)
    ]


async def test_dynamic_sampling_replaces_rejected_groups_with_new_ones(parts):
    from palaestra.agent.producer import DynamicSampling

    rounds_asked = []

    def more(step, round, n):
        rounds_asked.append((step, round, n))
        return backfill(step, round, n)

    # the first round's groups (ids 0, 1) are rejected; replacements (ids >= 100) are kept
    sampling = DynamicSampling(keep=lambda g: g[0].group_id >= 100, more_requests=more)
    p = producer(parts, dynamic_sampling=sampling)
    p.start()
    batch = await p.next_batch(step=1, num_groups=GROUPS)
    await p.stop()

    assert sorted(g[0].group_id for g in batch) == [100, 101]
    assert rounds_asked == [(1, 1, GROUPS)]
    assert (p.stats.groups_rejected, p.stats.replacement_rounds, p.stats.rejected_groups_used) == (
        2,
        1,
        0,
    )


async def test_dynamic_sampling_out_of_rounds_fills_the_step_with_rejected_groups(parts):
    from palaestra.agent.producer import DynamicSampling

    # every group has one answer, so equal rewards: all rejected, round after round
    sampling = DynamicSampling(
        keep=lambda g: len({t.reward for t in g}) > 1, more_requests=backfill, max_rounds=2
    )
    p = producer(parts, dynamic_sampling=sampling)
    p.start()
    batch = await p.next_batch(step=1, num_groups=GROUPS)
    await p.wait_produced(1)
    await p.stop()

    assert len(batch) == GROUPS  # the step still gets its groups
    assert p.stats.groups_rejected == GROUPS * 3  # the first round and two replacement rounds
    assert (p.stats.replacement_rounds, p.stats.rejected_groups_used) == (2, GROUPS)


async def test_a_group_lost_to_an_engine_death_is_sampled_again(parts, tokenizer):
    from palaestra.agent.errors import EngineError

    answer = [*tokenizer.encode("\\boxed{4}", add_special_tokens=False), tokenizer.eos_token_id]
    failed: list[tuple[int, ...]] = []

    def dies_under_the_first_task(prompt: list[int]) -> list[int]:
        # the engine dies under both episodes of the first task it sees, then restarts
        if len(failed) < SIZE and (not failed or failed[0] == tuple(prompt)):
            failed.append(tuple(prompt))
            raise EngineError("the engine process died")
        return answer

    pool, _, renderer = parts
    engine = FakeEngine(dies_under_the_first_task)
    p = producer((pool, engine, renderer))
    p.start()
    groups = await p.next_batch(step=1, num_groups=GROUPS)
    await p.stop()

    assert len(failed) == SIZE
    assert sorted(g[0].group_id for g in groups) == [0, 1]  # the step got all its groups
    assert all(t.stop_reason is StopReason.ANSWERED for g in groups for t in g)
    assert p.stats.groups_resampled_after_engine_error == 1
