"""The text environment contract: chat messages in, assistant text out.

A palaestra environment is a real ``gymnasium.Env``. Observations are lists of chat
messages (``{"role": ..., "content": ...}``) and actions are the assistant's message text,
so ``gymnasium.make``, ``gymnasium.register`` and gymnasium's wrappers all work on it.

- ``reset(seed=, options=)`` returns the messages that open the episode and an ``info`` dict
  (``info["task_id"]`` names the task; ``info["tools"]`` holds JSON-schema tool specs where
  the env offers tools).
- ``step(action)`` returns the new messages to append (tool results, user turns; empty when
  the episode ends), the reward, ``terminated``, ``truncated`` and ``info``, where
  ``info["reward_components"]`` names the parts of the reward.
- The ``info`` keys palaestra reads (these and ``success``, ``stop_reason``, the tool-call
  counts, ...) are typed once, in ``step_info.StepInfo``; envs build their dicts with it.
- Envs with a task set take a ``split`` constructor argument (``"train"`` or ``"test"``):
  the trainer builds its training envs with ``split="train"`` and evaluates on
  ``split="test"``, which must hold tasks training never sees. ``reset`` accepts
  ``options={"task_index": i}`` to pick task ``i`` of the split.
- ``areset`` / ``astep`` are what the rollout calls. They default to running the sync method
  in a worker thread; envs that wait on I/O override them.

What this module does not do: tokenization, chat templates, or anything model-side. The env
never sees token ids, and it imports no torch.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import gymnasium as gym


class Message(TypedDict, total=False):
    """One chat message, as chat templates expect it."""

    role: str
    content: str
    name: str
    tool_call_id: str


Messages = list[Message]


class TextSpace(gym.Space[str]):
    """Any Python string: the space of assistant messages."""

    def contains(self, x: Any) -> bool:
        return isinstance(x, str)

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        return "".join(chr(c) for c in self.np_random.integers(32, 127, size=16))


class MessagesSpace(gym.Space[Messages]):
    """Lists of chat messages, each a dict with string ``role`` and ``content``."""

    def contains(self, x: Any) -> bool:
        return isinstance(x, list) and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in x
        )

    def sample(self, mask: Any = None, probability: Any = None) -> Messages:
        return [
            {
                "role": "user",
                "content": TextSpace(seed=int(self.np_random.integers(1 << 31))).sample(),
            }
        ]


class TextEnv(gym.Env[Messages, str]):
    """Base class for palaestra environments; subclass and implement ``reset`` and ``step``.

    Subclasses call ``super().reset(seed=seed)`` first in ``reset`` so that ``self.np_random``
    is seeded the gymnasium way. Observations live in ``MessagesSpace`` and actions in
    ``TextSpace`` (any string), so gymnasium's passive checker accepts them.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium's own convention)
    observation_space: gym.Space[Messages] = MessagesSpace()
    action_space: gym.Space[str] = TextSpace()

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Play the assistant reply ``action``; see the module docstring for the 5-tuple."""
        raise NotImplementedError

    async def areset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Messages, dict[str, Any]]:
        """Async ``reset``; runs the sync method in a worker thread unless overridden."""
        return await asyncio.to_thread(self.reset, seed=seed, options=options)

    async def astep(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Async ``step``; runs the sync method in a worker thread unless overridden."""
        return await asyncio.to_thread(self.step, action)
