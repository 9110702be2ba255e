"""``SingleTurnEnv``: the base of one-question, one-reply envs (math, code, BFCL).

``reset`` opens one task of the split (``options={"task_index": i}`` picks task ``i``,
otherwise a draw from ``self.np_random``) and returns the messages and info the subclass's
``opening`` makes of it; the subclass's ``step`` takes the task back with ``take_task``,
which closes the episode, scores the reply and ends the episode. A subclass implements
``num_tasks``, ``task_at(index)`` and ``opening(task)``.

What this module does not do: multi-turn episodes (``ToolEnv`` is their base) or scoring.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from palaestra.envs.core import Message, Messages, TextEnv
from palaestra.envs.errors import ResetNeededError
from palaestra.envs.tasks import pick_task_index

TaskT = TypeVar("TaskT")


class SingleTurnEnv(TextEnv, Generic[TaskT]):
    """One task per episode, one step per episode (see the module docstring)."""

    task: TaskT | None = None
    """The task of the open episode (None between episodes)."""

    @property
    def num_tasks(self) -> int:
        """How many tasks the split holds."""
        raise NotImplementedError

    def task_at(self, index: int) -> TaskT:
        """Task ``index`` of the split."""
        raise NotImplementedError

    def opening(self, task: TaskT) -> tuple[Messages, dict[str, Any]]:
        """The messages that open an episode on ``task``, and reset's info."""
        raise NotImplementedError

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Messages, dict[str, Any]]:
        """Start an episode: ``options={"task_index": i}`` picks task ``i``, else a seeded draw."""
        super().reset(seed=seed)
        self.task = self.task_at(pick_task_index(options or {}, self.np_random, self.num_tasks))
        return self.opening(self.task)

    def take_task(self) -> TaskT:
        """The open episode's task, closing the episode; ``ResetNeededError`` if none is open."""
        if self.task is None:
            raise ResetNeededError(
                f"{type(self).__name__}.step() was called without an open episode: call "
                "reset() first (each episode takes exactly one step)."
            )
        task, self.task = self.task, None
        return task


def question_messages(system_prompt: str | None, question: str) -> Messages:
    """The system message (none when ``system_prompt`` is None), then the user's question."""
    messages: Messages = []
    if system_prompt is not None:
        messages.append(Message(role="system", content=system_prompt))
    messages.append(Message(role="user", content=question))
    return messages
