"""What the on-policy loop logs each step, besides the update's own metrics: rewards and
how episodes ended, staleness and dynamic-sampling counts, phase times and memory.

Pure functions of finished trajectories and the producer's counters; nothing here trains.
"""

from __future__ import annotations

import numpy as np

from palaestra.agent.evaluate import is_success
from palaestra.agent.producer import RolloutProducer, group_staleness
from palaestra.agent.rollout import episode_metrics
from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.trainer.stages.common import peak_rss_gb, rss_gb
from palaestra.trainer.stages.health import tool_use_metrics


def rollout_metrics(trajectories: list[Trajectory], episodes: list[Trajectory]) -> dict[str, float]:
    """Rewards, lengths and group statistics of the ``trajectories`` trained on, and how
    every one of the step's ``episodes`` ended (infrastructure failures included)."""
    rewards = np.array([tr.reward for tr in trajectories])
    lengths = np.array([tr.num_sampled_tokens for tr in trajectories])
    by_group: dict[int, list[float]] = {}
    for tr in trajectories:
        by_group.setdefault(tr.group_id, []).append(tr.reward)
    components: dict[str, list[float]] = {}
    for tr in trajectories:
        for name, value in tr.reward_components.items():
            components.setdefault(name, []).append(value)
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "tokens_mean": float(lengths.mean()),
        "truncated_frac": float(
            np.mean([tr.stop_reason is StopReason.MAX_TOKENS for tr in trajectories])
        ),
        "groups_uniform_frac": sum(max(r) == min(r) for r in by_group.values()) / len(by_group),
        "groups_all_solved_frac": sum(min(r) > 0 for r in by_group.values()) / len(by_group),
        "infra_failures": float(len(episodes) - len(trajectories)),
        **episode_metrics(episodes),
        **tool_use_metrics(trajectories),
        **{f"reward/{k}": float(np.mean(v)) for k, v in components.items()},
        **per_env_metrics(trajectories),
    }


def per_env_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Each env's reward, success rate and tool use (``<env id>/reward``, ...): a mixture's
    envs apart, and the one env of a plain run under its id."""
    by_env: dict[str, list[Trajectory]] = {}
    for tr in trajectories:
        by_env.setdefault(tr.env_id, []).append(tr)
    metrics: dict[str, float] = {}
    for env_id, played in sorted(by_env.items()):
        metrics[f"{env_id}/reward"] = float(np.mean([tr.reward for tr in played]))
        metrics[f"{env_id}/success"] = float(np.mean([is_success(tr) for tr in played]))
        metrics[f"{env_id}/episodes"] = float(len(played))
        tools = tool_use_metrics(played).get("tool_calls_per_episode")
        if tools is not None:
            metrics[f"{env_id}/tool_calls_per_episode"] = tools
    return metrics


def producer_metrics(
    groups: list[list[Trajectory]], step: int, producer: RolloutProducer, max_staleness: int
) -> dict[str, float]:
    """This step's staleness histogram (groups per lag, in policy versions), and the
    producer's running counts of stale and dynamic-sampling drops, and of groups sampled
    again after the engine died under them."""
    staleness = [group_staleness(g, step) for g in groups]
    stats = producer.stats
    return {
        "staleness/mean": float(np.mean(staleness)),
        "staleness/max": float(max(staleness)),
        **{f"staleness/groups_{k}": float(staleness.count(k)) for k in range(max_staleness + 1)},
        "staleness/dropped_groups_total": float(stats.groups_dropped_stale),
        "dynamic_sampling/groups_rejected_total": float(stats.groups_rejected),
        "dynamic_sampling/replacement_rounds_total": float(stats.replacement_rounds),
        "dynamic_sampling/rejected_groups_used_total": float(stats.rejected_groups_used),
        "engine/groups_resampled_total": float(stats.groups_resampled_after_engine_error),
    }


def step_resources(**seconds: float) -> dict[str, float]:
    """Phase times (``time/<phase>``) and this process's memory now and at its peak."""
    return {f"time/{name}": value for name, value in seconds.items()} | {
        "memory/rss_gb": rss_gb(),
        "memory/peak_rss_gb": peak_rss_gb(),
    }
