"""Evaluation: success rate, pass@k and token counts of a policy on an env's tasks.

``evaluate`` plays ``samples`` episodes on each of ``num_tasks`` tasks (task ``i`` is
chosen with ``options={"task_index": i}``) and reports the mean success, the unbiased
pass@k estimator of Chen et al. (2021) and the mean sampled tokens. An episode succeeds
when the env's last ``info["success"]`` is true, or, for envs that do not say, when its
reward is positive. Infrastructure failures are counted and left out of the rates.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, RolloutLimits, generate_groups
from palaestra.agent.trajectory import Trajectory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: the chance that k of n samples, c of them correct, include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def is_success(trajectory: Trajectory) -> bool:
    """Whether an episode solved its task (see the module docstring)."""
    success = trajectory.step_info.success
    return trajectory.reward > 0 if success is None else success


@dataclass(frozen=True)
class EvalResult:
    """Aggregate results of one evaluation."""

    num_tasks: int
    """Tasks evaluated."""
    samples: int
    """Episodes per task."""
    accuracy: float
    """Mean success over all scored episodes (pass@1 estimate)."""
    pass_at: dict[int, float]
    """Unbiased pass@k for k = 1 and k = ``samples``."""
    mean_reward: float
    """Mean episode reward over scored episodes."""
    mean_tokens: float
    """Mean sampled tokens per episode."""
    infra_failures: int
    """Episodes that failed for infrastructure reasons and were not scored."""
    stop_reasons: dict[str, int]
    """How many episodes ended for each reason."""
    by_category: dict[str, float]
    """Mean success per task category, for envs whose info names one (e.g. BFCL)."""

    def summary(self) -> str:
        ks = ", ".join(f"pass@{k}={v:.3f}" for k, v in sorted(self.pass_at.items()))
        line = (
            f"accuracy={self.accuracy:.3f} ({self.num_tasks} tasks x {self.samples}), {ks}, "
            f"mean_tokens={self.mean_tokens:.1f}, infra_failures={self.infra_failures}"
        )
        categories = "".join(f"\n  {c}: {a:.3f}" for c, a in sorted(self.by_category.items()))
        return line + categories


async def evaluate(
    pool: EnvPool,
    engine: Engine,
    renderer: ChatRenderer,
    sampling: SamplingParams,
    *,
    env_id: str,
    num_tasks: int,
    samples: int = 1,
    limits: RolloutLimits = RolloutLimits(),  # noqa: B008 (frozen, so safe to share)
    seed: int = 0,
) -> tuple[EvalResult, list[Trajectory]]:
    """Evaluate on tasks ``0..num_tasks-1`` with ``samples`` episodes each, every episode
    within ``limits``."""
    groups = [
        [
            EpisodeRequest(
                group_id=i,
                reset_seed=seed + i,
                options={"task_index": i},
                sampling_seed=(seed * 1_000_003 + i * 101 + j)
                if sampling.temperature > 0
                else None,
            )
            for j in range(samples)
        ]
        for i in range(num_tasks)
    ]
    trajectories: list[Trajectory] = []
    async for group in generate_groups(
        pool, engine, renderer, sampling, groups, env_id=env_id, limits=limits
    ):
        trajectories += group
    return summarize(trajectories, num_tasks=num_tasks, samples=samples), trajectories


def summarize(trajectories: list[Trajectory], *, num_tasks: int, samples: int) -> EvalResult:
    """Aggregate finished episodes into an ``EvalResult``."""
    scored = [t for t in trajectories if not t.stop_reason.is_infra_failure]
    by_task: dict[int, list[Trajectory]] = {}
    for t in scored:
        by_task.setdefault(t.group_id, []).append(t)
    categories: dict[str, list[float]] = {}
    for t in scored:
        if t.step_info.category is not None:
            categories.setdefault(t.step_info.category, []).append(float(is_success(t)))
    ks = sorted({1, samples})
    pass_at = {
        k: _mean(
            [pass_at_k(len(g), sum(map(is_success, g)), k) for g in by_task.values() if len(g) >= k]
        )
        for k in ks
    }
    return EvalResult(
        num_tasks=num_tasks,
        samples=samples,
        accuracy=_mean([float(is_success(t)) for t in scored]),
        pass_at=pass_at,
        mean_reward=_mean([t.reward for t in scored]),
        mean_tokens=_mean([float(t.num_sampled_tokens) for t in trajectories]),
        infra_failures=len(trajectories) - len(scored),
        stop_reasons=dict(Counter(t.stop_reason.value for t in trajectories)),
        by_category={name: _mean(values) for name, values in categories.items()},
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
