"""``EnvMixture``: several envs behind one, each task drawn from one of them by weight.

Training on a mixture of envs (``env: [{id: ..., weight: ...}, ...]`` in a config) runs
through this env: ``reset(seed=s)`` picks env ``i`` with probability ``weight_i / sum``,
a function of ``s`` alone, so every episode of a group (one reset seed) plays the same env
and task; the picked env's id goes into the reset info (``StepInfo.env_id``), so each
trajectory is logged and evaluated under the env that played it. ``step`` and ``astep`` go
to the picked env.

What this module does not do: mix rewards or tasks within an episode, or evaluate (the
held-out evaluation runs each env on its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from palaestra.envs.core import Messages, TextEnv
from palaestra.envs.errors import EnvConfigError, ResetNeededError


class EnvMixture(TextEnv):
    """Envs drawn by weight per reset seed (see the module docstring)."""

    def __init__(self, members: Sequence[tuple[str, gym.Env, float]]) -> None:
        """``members``: ``(env id, env, weight)`` for each env; weights > 0."""
        if not members:
            raise EnvConfigError("EnvMixture needs at least one env")
        if any(weight <= 0 for _, _, weight in members):
            raise EnvConfigError(f"EnvMixture weights must be > 0, got {[m[2] for m in members]}")
        self.ids = [env_id for env_id, _, _ in members]
        self.envs = [env for _, env, _ in members]
        weights = np.array([weight for _, _, weight in members], dtype=float)
        self.probabilities = weights / weights.sum()
        self.active: gym.Env | None = None

    def pick(self, seed: int | None) -> int:
        """The index of the env that reset seed ``seed`` plays (random without a seed)."""
        rng = np.random.default_rng(None if seed is None else [seed, 0x6D6978])
        return int(rng.choice(len(self.envs), p=self.probabilities))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Messages, dict[str, Any]]:
        super().reset(seed=seed)
        index = self.pick(seed)
        self.active = self.envs[index]
        observation, info = self.active.reset(seed=seed, options=options)
        return observation, {**info, "env_id": self.ids[index]}

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        return self._active().step(action)  # type: ignore[return-value]

    async def astep(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        inner = self._active().unwrapped
        if isinstance(inner, TextEnv):
            return await inner.astep(action)
        return await asyncio.to_thread(self.step, action)

    def _active(self) -> gym.Env:
        if self.active is None:
            raise ResetNeededError("EnvMixture.step() was called before reset()")
        return self.active

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.active = None
