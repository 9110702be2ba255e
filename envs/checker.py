"""``check_env``: does an environment keep the palaestra env contract?

Run it over every registered env (the test suite does) and over your own before training
on it. It plays a few short episodes and checks, in order:

1. ``type``: the env is a ``gymnasium.Env`` (normally a ``TextEnv``).
2. ``reset``: ``reset`` returns ``(messages, info)`` with valid chat messages and an info
   dict that keeps the ``StepInfo`` contract.
3. ``seed determinism``: the same seed gives the same opening messages.
4. ``seed variety``: different seeds do not all give the same opening messages.
5. ``step``: ``step`` returns a 5-tuple with messages, a float reward, bool flags, and an
   info dict that keeps the ``StepInfo`` contract, with ``reward_components`` mapping
   names to floats.
6. ``termination``: an episode ends (terminated or truncated) within ``max_steps`` steps.
7. ``close``: ``close`` can be called twice.

Each failure raises ``EnvCheckError`` naming the check. What it does not check: that the
rewards are meaningful, or the async methods (``areset``/``astep`` default to the sync
ones in a thread).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from palaestra.envs.core import MessagesSpace
from palaestra.envs.errors import EnvCheckError, StepInfoError
from palaestra.envs.step_info import StepInfo

_MESSAGES = MessagesSpace()
_VARIETY_SEEDS = range(8)


def check_env(env: gym.Env[Any, Any], action: str = "I am not sure.", max_steps: int = 100) -> None:
    """Check ``env`` against the env contract; raise ``EnvCheckError`` on the first failure.

    Args:
        env: the environment; it is closed at the end.
        action: the assistant reply played at every step.
        max_steps: how many steps an episode may take before ``termination`` fails.
    """
    if not isinstance(env, gym.Env):
        raise EnvCheckError("type", f"expected a gymnasium.Env, got {type(env).__name__}.")
    first, _ = _checked_reset(env, seed=0)
    again, _ = _checked_reset(env, seed=0)
    if first != again:
        raise EnvCheckError(
            "seed determinism",
            "reset(seed=0) twice gave different messages; draw all randomness from "
            "self.np_random after super().reset(seed=seed).",
        )
    openings = {repr(_checked_reset(env, seed=seed)[0]) for seed in _VARIETY_SEEDS}
    if len(openings) == 1:
        raise EnvCheckError(
            "seed variety",
            f"reset gave the same messages for seeds {list(_VARIETY_SEEDS)}; the episode "
            "seed should pick the task.",
        )
    _checked_reset(env, seed=1)
    _play_episode(env, action, max_steps)
    try:
        env.close()
        env.close()
    except Exception as error:
        raise EnvCheckError(
            "close", f"closing twice raised {error!r}; make close idempotent."
        ) from error


def _checked_reset(env: gym.Env[Any, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    result = env.reset(seed=seed)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise EnvCheckError("reset", f"reset must return (messages, info), got {result!r:.200}.")
    messages, info = result
    if not _MESSAGES.contains(messages) or not messages:
        raise EnvCheckError(
            "reset",
            "reset's observation must be a non-empty list of {'role': str, 'content': str} "
            f"dicts, got {messages!r:.200}.",
        )
    if not isinstance(info, dict):
        raise EnvCheckError("reset", f"reset's info must be a dict, got {type(info).__name__}.")
    problem = _step_info_problem(env, info)
    if problem is not None:
        raise EnvCheckError("reset", problem)
    return messages, info


def _play_episode(env: gym.Env[Any, Any], action: str, max_steps: int) -> None:
    for _ in range(max_steps):
        terminated, truncated = _checked_step(env, action)
        if terminated or truncated:
            return
    raise EnvCheckError(
        "termination",
        f"the episode did not end within {max_steps} steps of {action!r}; add a turn limit "
        "(truncated=True) or pass a larger max_steps.",
    )


def _checked_step(env: gym.Env[Any, Any], action: str) -> tuple[bool, bool]:
    result = env.step(action)
    if not (isinstance(result, tuple) and len(result) == 5):
        raise EnvCheckError(
            "step",
            f"step must return (messages, reward, terminated, truncated, info), got {result!r:.200}.",
        )
    messages, reward, terminated, truncated, info = result
    problems = []
    if not _MESSAGES.contains(messages):
        problems.append(f"messages must be a list of chat messages, got {messages!r:.200}")
    if not isinstance(reward, float):
        problems.append(f"reward must be a float, got {type(reward).__name__}")
    if not (isinstance(terminated, bool) and isinstance(truncated, bool)):
        problems.append(
            f"terminated and truncated must be bools, got {type(terminated).__name__} "
            f"and {type(truncated).__name__}"
        )
    if not isinstance(info, dict):
        problems.append(f"info must be a dict, got {type(info).__name__}")
    else:
        problem = _step_info_problem(env, info)
        problems.extend([problem] if problem is not None else _reward_component_problems(info))
    if problems:
        raise EnvCheckError("step", "; ".join(problems) + ".")
    return terminated, truncated


def _step_info_problem(env: gym.Env[Any, Any], info: dict[str, Any]) -> str | None:
    try:
        StepInfo.from_info(info, env=type(env.unwrapped).__name__)
    except StepInfoError as error:
        return str(error).rstrip(".")
    return None


def _reward_component_problems(info: dict[str, Any]) -> list[str]:
    components = info.get("reward_components")
    if not isinstance(components, dict):
        return [f"info['reward_components'] must be a dict of floats, got {components!r:.200}"]
    return [
        f"info['reward_components'][{name!r}] must be a float, got {type(value).__name__}"
        for name, value in components.items()
        if not (isinstance(name, str) and isinstance(value, float))
    ]
