"""Is the run learning anything? Tool-use health per step, and an alarm for runs without a
learning signal.

The field's most common failure in agentic RL is a run that spends its hours on zero
gradient: a tool env where the model never emits a parsable tool call (so every episode
ends the same way), or groups whose rewards are all equal (so every advantage is 0).
``tool_use_metrics`` puts the first in every step's log; ``SignalWatch`` counts the steps in
a row with either, and after ``trainer.no_signal_steps`` prints what is wrong, the likely
causes and the remedies (once per kind), and can stop the run.

What this module does not do: change the training (dynamic sampling, warm starts and
curricula are the remedies it names).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from palaestra.agent.trajectory import StopReason, Trajectory

NO_TOOL_CALLS = (
    "no tool call was parsed in any episode of the last {n} steps: the model never calls "
    "a tool, so every episode ends alike and there is nothing to learn. Likely causes: the "
    "model has never seen this env's tool-call format (env kwarg tool_format); the chat "
    "template drops the tools (run `palaestra audit-template MODEL`); too few tokens per "
    "turn (rollout.max_tokens). Remedies: warm-start with SFT on the env's expert episodes "
    "(`palaestra collect --env ID --policy oracle --out data.jsonl`, then a `stage: sft` "
    "before this one), a larger rollout.group_size, grpo.dynamic_sampling: true."
)
NO_SIGNAL = (
    "every group's rewards were equal in each of the last {n} steps: every advantage is 0 "
    "and the steps train nothing. Likely causes: tasks far too hard (all fail) or too easy "
    "(all pass) for this model, or a reward that cannot vary. Remedies: "
    "grpo.dynamic_sampling: true (replaces such groups with new tasks), a larger "
    "rollout.group_size, easier tasks first (a curriculum), an SFT warm start."
)


def tool_use_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Per-episode tool use of a step (for envs that report tool-call counts): calls, the
    share of call attempts that were valid, parse errors, turns, and how episodes ended."""
    infos = [t.step_info for t in trajectories]
    counted = [i for i in infos if i.tool_calls is not None]
    metrics = {
        "turns_mean": float(np.mean([len(t.turns) for t in trajectories])),
        "answered_frac": _share(trajectories, StopReason.ANSWERED),
        "out_of_turns_frac": _share(trajectories, StopReason.MAX_TURNS),
    }
    if not counted:
        return metrics
    calls = sum(i.tool_calls or 0 for i in counted)
    parse_errors = sum(i.parse_errors or 0 for i in counted)
    invalid = sum((i.unknown_tools or 0) + (i.bad_arguments or 0) for i in counted)
    attempts = calls + parse_errors
    return metrics | {
        "tool_calls_per_episode": calls / len(counted),
        "parse_errors_per_episode": parse_errors / len(counted),
        "valid_call_rate": (calls - invalid) / attempts if attempts else 0.0,
    }


def _share(trajectories: Sequence[Trajectory], reason: StopReason) -> float:
    return float(np.mean([t.stop_reason is reason for t in trajectories]))


class SignalWatch:
    """Counts steps in a row without a learning signal and raises the alarm once per kind."""

    def __init__(self, steps: int) -> None:
        """``steps``: how many such steps in a row set the alarm off (0: never)."""
        self.steps = steps
        self.without_tool_calls = 0
        self.without_signal = 0
        self.raised: set[str] = set()

    def update(self, metrics: dict[str, float]) -> list[str]:
        """Read a step's metrics; returns the alarms this step raised (printed already)."""
        if "tool_calls_per_episode" in metrics:
            silent = metrics["tool_calls_per_episode"] == 0
            self.without_tool_calls = self.without_tool_calls + 1 if silent else 0
        uniform = metrics.get("groups_uniform_frac") == 1.0
        self.without_signal = self.without_signal + 1 if uniform else 0
        alarms = []
        if self.steps and self.without_tool_calls >= self.steps:
            alarms.append(self._raise("no_tool_calls", NO_TOOL_CALLS))
        if self.steps and self.without_signal >= self.steps:
            alarms.append(self._raise("no_signal", NO_SIGNAL))
        return [a for a in alarms if a]

    def _raise(self, kind: str, text: str) -> str:
        if kind in self.raised:
            return ""
        self.raised.add(kind)
        message = text.format(n=self.steps)
        print(f"\n*** [no learning signal] {message}\n", file=sys.stderr)
        return kind
