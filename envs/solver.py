"""Scripted solvers: an env that knows how an expert solves its tasks says so.

An env implements ``expert_action()`` when it can script the expert's next assistant
message for the open episode: a tool call written in the env's own tool-call format, or
the final answer once the tool results are in. ``palaestra collect --policy oracle`` plays
episodes with it and writes them as SFT data, rendered exactly as rollouts render them, so
a model can be warm-started on the env's own format before RL.

What this module does not do: play episodes or render them (``palaestra.agent.collect``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import gymnasium as gym


@runtime_checkable
class ScriptedSolver(Protocol):
    """An env whose open episode an expert script can play, one assistant turn at a time."""

    def expert_action(self) -> str:
        """The expert's next assistant message for the open episode (after ``reset`` or a
        ``step`` that did not end it), in the format ``step`` parses."""
        ...


def solver_of(env: gym.Env) -> ScriptedSolver | None:
    """The env (under any wrappers) as a ``ScriptedSolver``, or None if it has no solver."""
    inner = env.unwrapped
    return inner if isinstance(inner, ScriptedSolver) else None
