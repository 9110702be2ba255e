"""Rollouts: play episodes between an engine and envs, concurrently, as token sequences.

``run_episode`` alternates engine turns and env steps until the env ends the episode or
the turn budget runs out, building one ``Trajectory``: prompt and env tokens with loss mask
0, sampled tokens verbatim with mask 1 and their behaviour logprobs. ``generate_groups``
runs many episodes at once with asyncio and yields each group of ``group_size`` episodes on
one task as soon as it is complete; the engine batches the concurrent requests.

Failures of the engine or the env become trajectories with an infrastructure stop reason
(and the error text in ``info["error"]``), so the trainer can drop them instead of training
on them as reward 0. Errors in the renderer (template drift) are bugs of the set-up and are
raised.

What this module does not do: choose tasks, compute advantages, or touch torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from palaestra.agent.engines.base import Completion, Engine, SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.trajectory import StopReason, Trajectory, Turn
from palaestra.envs.core import Messages, TextEnv


class EnvPool:
    """A fixed set of env instances shared by concurrent episodes (one episode per env at a time)."""

    def __init__(self, make_env: Callable[[], gym.Env], size: int) -> None:
        if size < 1:
            raise ValueError(f"EnvPool size must be >= 1, got {size}")
        self.envs = [make_env() for _ in range(size)]
        self._free: asyncio.Queue[gym.Env] = asyncio.Queue()
        for env in self.envs:
            self._free.put_nowait(env)

    @asynccontextmanager
    async def borrow(self) -> AsyncIterator[gym.Env]:
        env = await self._free.get()
        try:
            yield env
        finally:
            self._free.put_nowait(env)

    def close(self) -> None:
        for env in self.envs:
            env.close()


@dataclass(frozen=True)
class EpisodeRequest:
    """Which episode to play: the reset arguments and the group it belongs to."""

    group_id: int
    """Episodes with the same group id answer the same task."""
    reset_seed: int
    """Seed passed to ``env.reset``; equal seeds give equal tasks."""
    options: dict[str, Any] | None = None
    """Options passed to ``env.reset`` (e.g. ``{"task_index": 3}``)."""
    sampling_seed: int | None = None
    """Seed for the engine's sampling of this episode's first turn."""


async def _reset(env: gym.Env, seed: int, options: dict[str, Any] | None) -> tuple[Messages, dict]:
    if isinstance(env, TextEnv):
        return await env.areset(seed=seed, options=options)
    return await asyncio.to_thread(env.reset, seed=seed, options=options)  # wrapped envs


async def _step(env: gym.Env, action: str) -> tuple[Messages, float, bool, bool, dict]:
    if isinstance(env, TextEnv):
        return await env.astep(action)
    observation, reward, terminated, truncated, info = await asyncio.to_thread(env.step, action)
    return observation, float(reward), terminated, truncated, info


async def run_episode(
    env: gym.Env,
    engine: Engine,
    renderer: ChatRenderer,
    sampling: SamplingParams,
    request: EpisodeRequest,
    *,
    env_id: str,
    max_turns: int = 1,
) -> Trajectory:
    """Play one episode and return it as a trajectory."""
    messages, info = await _reset(env, request.reset_seed, request.options)
    messages = list(messages)
    tools = info.get("tools")
    task_id = str(info.get("task_id", request.reset_seed))
    token_ids = renderer.prompt_ids(messages, tools)
    loss_mask = [0] * len(token_ids)
    logprobs = [0.0] * len(token_ids)
    turns: list[Turn] = []
    reward, components = 0.0, dict[str, float]()
    versions: list[int] = []
    stop, error = StopReason.MAX_TURNS, None
    for turn_index in range(max_turns):
        seed = None if request.sampling_seed is None else request.sampling_seed + turn_index
        try:
            completion: Completion = await engine.generate(
                token_ids, SamplingParams(**{**sampling.__dict__, "seed": seed})
            )
        except Exception as exc:  # an engine failure says nothing about the policy
            stop, error = StopReason.ENGINE_ERROR, f"{type(exc).__name__}: {exc}"
            break
        versions.append(completion.policy_version)
        text = renderer.decode(list(completion.token_ids))
        start = len(token_ids)
        token_ids += completion.token_ids
        loss_mask += [1] * len(completion.token_ids)
        logprobs += completion.logprobs
        turns.append(Turn(start, len(token_ids), text, completion.finish_reason))
        messages.append({"role": "assistant", "content": text})
        try:
            observation, step_reward, terminated, truncated, info = await _step(env, text)
        except Exception as exc:  # an env crash is an infrastructure failure
            stop, error = StopReason.ENV_ERROR, f"{type(exc).__name__}: {exc}"
            break
        reward += float(step_reward)
        for name, value in info.get("reward_components", {}).items():
            components[name] = components.get(name, 0.0) + float(value)
        if terminated:
            stop = (
                StopReason.MAX_TOKENS
                if completion.finish_reason == "length"
                else StopReason.ANSWERED
            )
            break
        if truncated or turn_index == max_turns - 1:
            break
        extension = renderer.continuation_ids(
            messages, list(completion.token_ids), observation, tools
        )
        messages += observation
        token_ids += extension
        loss_mask += [0] * len(extension)
        logprobs += [0.0] * len(extension)
    extra = {k: v for k, v in info.items() if k not in ("tools", "reward_components")}
    if error is not None:
        extra["error"] = error
    return Trajectory(
        token_ids=tuple(token_ids),
        loss_mask=tuple(loss_mask),
        logprobs=tuple(logprobs),
        turns=tuple(turns),
        reward=reward,
        reward_components=components,
        stop_reason=stop,
        policy_version=versions[0] if versions else engine.policy_version,
        group_id=request.group_id,
        env_id=env_id,
        task_id=task_id,
        info=extra,
    )


async def generate_groups(
    pool: EnvPool,
    engine: Engine,
    renderer: ChatRenderer,
    sampling: SamplingParams,
    groups: Sequence[Sequence[EpisodeRequest]],
    *,
    env_id: str,
    max_turns: int = 1,
) -> AsyncIterator[list[Trajectory]]:
    """Play every episode of ``groups`` concurrently; yield each group when it completes."""

    async def play(request: EpisodeRequest) -> Trajectory:
        async with pool.borrow() as env:
            return await run_episode(
                env, engine, renderer, sampling, request, env_id=env_id, max_turns=max_turns
            )

    async def play_group(requests: Sequence[EpisodeRequest]) -> list[Trajectory]:
        return list(await asyncio.gather(*(play(r) for r in requests)))

    tasks = [asyncio.ensure_future(play_group(g)) for g in groups]
    try:
        for finished in asyncio.as_completed(tasks):
            yield await finished
    finally:
        for task in tasks:
            task.cancel()
