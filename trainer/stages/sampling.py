"""Which tasks each on-policy step samples, and the producer that samples them.

A step's groups are a function of the seed and the step only (``group_requests``), so a
run's task order does not depend on timing; dynamic sampling's replacement rounds draw
from the same function with their round number.
"""

from __future__ import annotations

import numpy as np

from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.producer import DynamicSampling, RolloutProducer
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest
from palaestra.agent.trajectory import Trajectory
from palaestra.config import OnPolicyStageConfig
from palaestra.trainer.stages.common import env_label, rollout_limits


def rollout_producer(
    cfg: OnPolicyStageConfig,
    engine: Engine,
    renderer: ChatRenderer,
    pool: EnvPool,
    rounds: int,
) -> RolloutProducer:
    """The background producer of the run's groups (``agent.producer``), with DAPO's dynamic
    sampling for ``rounds`` replacement rounds per step when ``rounds`` > 0."""
    r = cfg.rollout
    dynamic_sampling = DynamicSampling(
        keep=_informative,
        more_requests=lambda step, round, n: group_requests(cfg, step, rounds, round, n),
        max_rounds=rounds,
    )
    return RolloutProducer(
        pool,
        engine,
        renderer,
        SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p),
        lambda step: group_requests(cfg, step, rounds),
        env_id=env_label(cfg),
        limits=rollout_limits(cfg),
        max_staleness=r.max_staleness,
        queue_groups=r.tasks_per_step * (r.max_staleness + 1),
        dynamic_sampling=dynamic_sampling if rounds else None,
    )


def group_requests(
    cfg: OnPolicyStageConfig, step: int, rounds: int, round: int = 0, count: int | None = None
) -> list[list[EpisodeRequest]]:
    """The groups of training step ``step``: one reset seed per group, so all its episodes
    get the same task, and distinct sampling seeds. A function of the seed, the step and the
    dynamic-sampling ``round`` (0: the step's own groups) only, so a step's tasks do not
    depend on when they are sampled; group ids are unique across steps and the ``rounds``
    replacement rounds of dynamic sampling."""
    rng = np.random.default_rng([cfg.seed, step, round])
    tasks = cfg.rollout.tasks_per_step
    first_group_id = ((step - 1) * (rounds + 1) + round) * tasks
    groups = []
    for g in range(tasks if count is None else count):
        reset_seed = int(rng.integers(2**31))
        groups.append(
            [
                EpisodeRequest(
                    group_id=first_group_id + g,
                    reset_seed=reset_seed,
                    sampling_seed=int(rng.integers(2**31)),
                )
                for _ in range(cfg.rollout.group_size)
            ]
        )
    return groups


def _informative(group: list[Trajectory]) -> bool:
    """Whether a group's trainable episodes differ in reward (else its advantages are 0)."""
    rewards = {tr.reward for tr in group if not tr.stop_reason.is_infra_failure}
    return len(rewards) > 1
