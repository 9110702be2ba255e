"""Evaluation: trajectory success rates of a policy on an env's tasks.

``evaluate`` plays ``samples`` episodes on each of ``num_tasks`` tasks (task ``i`` is
chosen with ``options={"task_index": i}``); ``summarize`` turns the episodes into an
``EvalResult``:

- the success rate (the pass@1 estimate) and its standard error over tasks;
- pass@k and pass^k for k = 1 and k = ``samples``, both unbiased estimators over all n
  samples of a task, c of them successes. pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al.,
  2021) is the chance that k samples include a success; pass^k = C(c, k) / C(n, k) (Yao
  et al., 2024, tau-bench) is the chance that all k succeed: reliability, not luck;
- mean turns, tool calls and sampled tokens per episode, the success rate by number of
  turns, the stop-reason breakdown, and the success rate per category where tasks name one.

An episode succeeds when the env's last ``info["success"]`` is true, or, for envs that do
not say, when its reward is positive. Every episode counts in every figure: an
infrastructure failure (engine, env or tool down, timeout) is a failed episode in the
success rate, and ``infra_failures`` says how many there were beside it, so a run whose
infrastructure failed never looks better than one that ran. (Training instead drops such
episodes from the gradient; see ``agent.trajectory``.)

Two traps are closed here: a ``num_tasks`` above what the env's split holds is capped to
the split's size, with a ``note`` in the result (asking past the end used to score the
missing tasks as infrastructure failures); and ``env_turn_limit`` reads the turn budget an
env states for itself, so a caller need not guess how many turns a multi-turn env needs.

What this module does not do: choose envs, load models or write files (``palaestra eval``
does), or retry infrastructure failures.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.errors import RolloutConfigError
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, RolloutLimits, generate_groups
from palaestra.agent.trajectory import Trajectory
from palaestra.envs.single_turn import SingleTurnEnv


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: the chance that k of n samples, c of them correct, include a correct one."""
    _check_counts(n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """Unbiased pass^k: the chance that k of n samples, c of them correct, are all correct,
    ``C(c, k) / C(n, k)`` (0 when c < k)."""
    _check_counts(n, c, k)
    return math.comb(c, k) / math.comb(n, k)


def _check_counts(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k and pass^k need 0 <= c <= n and 1 <= k <= n, got {n=} {c=} {k=}")


def is_success(trajectory: Trajectory) -> bool:
    """Whether the env judged an episode a success (see the module docstring); an
    infrastructure failure never is."""
    if trajectory.stop_reason.is_infra_failure:
        return False
    return judged_success(trajectory.reward, trajectory.step_info.success)


def judged_success(reward: float, success: bool | None) -> bool:
    """The env's ``success`` where it reports one, else a positive reward."""
    return reward > 0 if success is None else success


def env_turn_limit(env: gym.Env) -> int | None:
    """The assistant turns per episode ``env`` states for itself: 1 for a single-turn env,
    its ``max_turns`` where it has an integer one (every ``ToolEnv``), else None."""
    inner = env.unwrapped
    if isinstance(inner, SingleTurnEnv):
        return 1
    turns = getattr(inner, "max_turns", None)
    return turns if isinstance(turns, int) and not isinstance(turns, bool) else None


def env_num_tasks(env: gym.Env) -> int | None:
    """How many tasks ``env``'s split holds, where it says (its integer ``num_tasks``)."""
    size = getattr(env.unwrapped, "num_tasks", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


@dataclass(frozen=True)
class EvalResult:
    """Aggregate results of one evaluation on one env; every figure is over all
    ``num_tasks x samples`` episodes, infrastructure failures included."""

    num_tasks: int
    """Tasks evaluated (after capping to the split's size; see ``note``)."""
    samples: int
    """Episodes per task."""
    accuracy: float
    """Success rate over every episode, infrastructure failures counted as failures (the
    pass@1 estimate)."""
    pass_at: dict[int, float]
    """Unbiased pass@k for k = 1 and k = ``samples``."""
    mean_reward: float
    """Mean episode reward (an infrastructure failure's reward is 0)."""
    mean_tokens: float
    """Mean sampled tokens per episode."""
    infra_failures: int
    """Episodes that ended in an infrastructure failure (counted as failures above)."""
    stop_reasons: dict[str, int]
    """How many episodes ended for each reason."""
    by_category: dict[str, float]
    """Success rate per task category, for envs whose info names one (e.g. BFCL)."""
    accuracy_stderr: float
    """Standard error of ``accuracy``, over tasks (the samples of a task are not
    independent); 0 for a single task."""
    pass_hat: dict[int, float]
    """Unbiased pass^k (all k samples succeed) for k = 1 and k = ``samples``."""
    mean_turns: float
    """Mean assistant turns per episode."""
    mean_tool_calls: float
    """Mean tool calls per episode, from the env's ``tool_calls`` count (0 where an env
    reports none)."""
    success_by_turns: dict[int, float]
    """Number of assistant turns -> success rate of the episodes that took that many."""
    episodes_by_turns: dict[int, int]
    """Number of assistant turns -> how many episodes took that many."""
    note: str | None = None
    """What the evaluation changed from what was asked (e.g. tasks capped to the split)."""

    def summary(self) -> str:
        """One line of the main figures, then the note and the categories, if any."""
        rates = [f"pass@{k}={v:.3f}" for k, v in sorted(self.pass_at.items())]
        rates += [f"pass^{k}={v:.3f}" for k, v in sorted(self.pass_hat.items()) if k > 1]
        line = (
            f"accuracy={self.accuracy:.3f}±{self.accuracy_stderr:.3f} "
            f"({self.num_tasks} tasks x {self.samples}), {', '.join(rates)}, "
            f"turns={self.mean_turns:.2f}, tool_calls={self.mean_tool_calls:.2f}, "
            f"mean_tokens={self.mean_tokens:.1f}, infra_failures={self.infra_failures}"
        )
        note = f"\n  note: {self.note}" if self.note else ""
        categories = "".join(f"\n  {c}: {a:.3f}" for c, a in sorted(self.by_category.items()))
        return line + note + categories


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
    within ``limits``; ``num_tasks`` is capped to the size of the pool's split (with a
    note). The episodes come back ordered by task, then sample."""
    if num_tasks < 1 or samples < 1:
        raise RolloutConfigError(
            f"evaluate needs num_tasks and samples >= 1, got {num_tasks}, {samples}"
        )
    available, note = env_num_tasks(pool.envs[0]), None
    if available is not None and num_tasks > available:
        note = (
            f"{num_tasks} tasks asked for, but the split holds {available}: "
            f"evaluated all {available}"
        )
        num_tasks = available
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
    trajectories.sort(key=lambda t: t.group_id)  # stable: samples stay in request order
    result = summarize(trajectories, num_tasks=num_tasks, samples=samples, note=note)
    return result, trajectories


def summarize(
    trajectories: list[Trajectory], *, num_tasks: int, samples: int, note: str | None = None
) -> EvalResult:
    """Aggregate finished episodes into an ``EvalResult`` (every episode counts)."""
    by_task: dict[int, list[bool]] = {}
    by_turns: dict[int, list[float]] = {}
    categories: dict[str, list[float]] = {}
    for t in trajectories:
        by_task.setdefault(t.group_id, []).append(is_success(t))
        by_turns.setdefault(len(t.turns), []).append(float(is_success(t)))
        if t.step_info.category is not None:
            categories.setdefault(t.step_info.category, []).append(float(is_success(t)))
    ks = sorted({1, samples})
    return EvalResult(
        num_tasks=num_tasks,
        samples=samples,
        accuracy=_mean([float(is_success(t)) for t in trajectories]),
        pass_at={k: _per_task(pass_at_k, by_task, k) for k in ks},
        mean_reward=_mean([t.reward for t in trajectories]),
        mean_tokens=_mean([float(t.num_sampled_tokens) for t in trajectories]),
        infra_failures=sum(t.stop_reason.is_infra_failure for t in trajectories),
        stop_reasons=dict(Counter(t.stop_reason.value for t in trajectories)),
        by_category={name: _mean(values) for name, values in categories.items()},
        accuracy_stderr=_stderr([_mean([float(s) for s in g]) for g in by_task.values()]),
        pass_hat={k: _per_task(pass_hat_k, by_task, k) for k in ks},
        mean_turns=_mean([float(len(t.turns)) for t in trajectories]),
        mean_tool_calls=_mean([float(t.step_info.tool_calls or 0) for t in trajectories]),
        success_by_turns={n: _mean(values) for n, values in sorted(by_turns.items())},
        episodes_by_turns={n: len(values) for n, values in sorted(by_turns.items())},
        note=note,
    )


def _per_task(
    estimator: Callable[[int, int, int], float], by_task: Mapping[int, list[bool]], k: int
) -> float:
    """The mean over tasks of ``estimator(n, c, k)``, for tasks with at least k samples."""
    return _mean([estimator(len(g), sum(g), k) for g in by_task.values() if len(g) >= k])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _stderr(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n))."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def episode_records(
    trajectories: list[Trajectory], decode: Callable[[list[int]], str]
) -> list[dict[str, Any]]:
    """One JSON-ready record per episode: env, task, sample index within the task, reward,
    success, stop reason, turns, tool calls, the decoded text (and the error of an
    infrastructure failure)."""
    seen: Counter[int] = Counter()
    records = []
    for t in trajectories:
        records.append(
            {
                "env_id": t.env_id,
                "task_id": t.task_id,
                "task_index": t.group_id,
                "sample": seen[t.group_id],
                "reward": t.reward,
                "reward_components": t.reward_components,
                "success": is_success(t),
                "stop_reason": t.stop_reason.value,
                "turns": len(t.turns),
                "tool_calls": t.step_info.tool_calls or 0,
                "text": decode(list(t.token_ids)),
                **({"error": t.info["error"]} if "error" in t.info else {}),
            }
        )
        seen[t.group_id] += 1
    return records


def results_table(results: Mapping[str, EvalResult]) -> str:
    """The results as an aligned text table, one row per env (k is the samples per task)."""
    header = ["env", "tasks x k", "success", "pass@k", "pass^k", "turns", "tool calls"]
    header += ["infra failures", "stop reasons"]
    rows = [header]
    for name, r in results.items():
        stops = ", ".join(f"{s} {n}" for s, n in Counter(r.stop_reasons).most_common())
        rows.append(
            [
                name,
                f"{r.num_tasks} x {r.samples}",
                f"{r.accuracy:.3f} ± {r.accuracy_stderr:.3f}",
                f"{r.pass_at[r.samples]:.3f}",
                f"{r.pass_hat[r.samples]:.3f}",
                f"{r.mean_turns:.2f}",
                f"{r.mean_tool_calls:.2f}",
                str(r.infra_failures),
                stops,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
