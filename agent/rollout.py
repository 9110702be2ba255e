"""Rollouts: play episodes between an engine and envs, concurrently, as token sequences.

``run_episode`` alternates engine turns and env steps until the env ends the episode or a
limit is reached, building one ``Trajectory``: prompt and env tokens with loss mask 0,
sampled tokens verbatim with mask 1 and their behaviour logprobs. ``generate_groups`` runs
many episodes at once with asyncio and yields each group of ``group_size`` episodes on one
task as soon as it is complete; the engine batches the concurrent requests.

Each turn's prompt extends the previous tokens (``ChatRenderer.continuation_ids``). Where
the chat template rewrites history instead, the episode splits: the whole conversation is
rendered afresh as the prompt of a new segment (a separate training sample), and sampling
goes on from it. No token is ever trained on that the engine did not sample.

Limits (one ``RolloutLimits`` record), each ending the episode with the stop reason in
brackets (see ``StopReason``):

- ``max_turns`` assistant turns (``max_turns``);
- ``max_total_tokens`` tokens in a training sample, prompt and env tokens included: each turn may
  sample only what remains, and the episode stops when the next turn has no room
  (``max_tokens``);
- ``max_episode_s`` seconds of wall clock from reset (``timeout``, an infrastructure
  failure). A generation that overruns is cancelled; an env call is not interrupted (an
  env stopped mid-step could not be reused), so the episode stops after it.

Env reports: every ``info`` is read as an ``envs.StepInfo``; one that breaks that contract
ends the episode as ``env_error``, the message naming the env and the key, and so does a
NaN or infinite reward or reward component (a broken reward says nothing about the policy,
and would turn the step's loss into NaN). A step's
``stop_reason`` (an ``EnvStopReason``) is the reason the episode ends with if it ends after
that step; an infrastructure reason (``tool_error``, ``env_error``) ends it at once, with
``error`` explaining it. A completion cut at its token limit makes the episode's last reason
``max_tokens`` whatever the env says, unless the env reports an infrastructure failure.

Failures of the engine or the env become trajectories with an infrastructure stop reason
(and the error text in ``info["error"]``), so the trainer can drop them instead of training
on them as reward 0.

What this module does not do: choose tasks, compute advantages, or touch torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from palaestra.agent.engines.base import Completion, Engine, SamplingParams
from palaestra.agent.errors import RolloutConfigError
from palaestra.agent.render import ChatRenderer
from palaestra.agent.trajectory import StopReason, Trajectory, Turn
from palaestra.envs.core import Messages, TextEnv
from palaestra.envs.step_info import StepInfo


@dataclass(frozen=True)
class RolloutLimits:
    """The limits of every episode of a rollout (see the module docstring); None: no limit."""

    max_turns: int = 1
    """Assistant turns per episode (stop reason ``max_turns``)."""
    max_total_tokens: int | None = None
    """Tokens per training sample, prompt and env tokens included (``max_tokens``)."""
    max_episode_s: float | None = None
    """Seconds of wall clock from reset (``timeout``, an infrastructure failure)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1 or (self.max_total_tokens is not None and self.max_total_tokens < 1):
            raise RolloutConfigError(
                f"max_turns and max_total_tokens must be >= 1, got {self.max_turns} and "
                f"{self.max_total_tokens}"
            )
        if self.max_episode_s is not None and self.max_episode_s <= 0:
            raise RolloutConfigError(f"max_episode_s must be > 0, got {self.max_episode_s}")


class EnvPool:
    """A fixed set of env instances shared by concurrent episodes (one episode per env at a time)."""

    def __init__(self, make_env: Callable[[], gym.Env], size: int) -> None:
        if size < 1:
            raise RolloutConfigError(f"EnvPool size must be >= 1, got {size}")
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
    """Seed for the engine's sampling of this episode's first turn (turn ``k`` adds ``k``)."""


async def _reset(env: gym.Env, seed: int, options: dict[str, Any] | None) -> tuple[Messages, dict]:
    if isinstance(env, TextEnv):
        return await env.areset(seed=seed, options=options)
    return await asyncio.to_thread(env.reset, seed=seed, options=options)  # wrapped envs


async def _step(env: gym.Env, action: str) -> tuple[Messages, float, bool, bool, dict]:
    if isinstance(env, TextEnv):
        return await env.astep(action)
    observation, reward, terminated, truncated, info = await asyncio.to_thread(env.step, action)
    return observation, float(reward), terminated, truncated, info


@dataclass
class _Episode:
    """The growing record of one episode, turned into a ``Trajectory`` by ``finish``."""

    request: EpisodeRequest
    env_id: str
    task_id: str
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    segment_starts: list[int] = field(default_factory=lambda: [0])
    turns: list[Turn] = field(default_factory=list)
    components: dict[str, float] = field(default_factory=dict)
    versions: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    """The env's last info."""

    @property
    def sample_ids(self) -> list[int]:
        """The tokens of the current training sample: the next turn's prompt."""
        return self.token_ids[self.segment_starts[-1] :]

    def room(self, max_total_tokens: int | None, ids: list[int], *, new_sample: bool) -> int:
        """Tokens left to sample once ``ids`` join this sample (or open a new one)."""
        if max_total_tokens is None:
            return sys.maxsize
        return max_total_tokens - len(ids) - (0 if new_sample else len(self.sample_ids))

    def add_prompt(self, ids: list[int], *, new_sample: bool = False) -> None:
        if new_sample:
            self.segment_starts.append(len(self.token_ids))
        self.token_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def add_turn(self, completion: Completion, text: str, reward: float) -> None:
        start = len(self.token_ids)
        self.token_ids += completion.token_ids
        self.loss_mask += [1] * len(completion.token_ids)
        self.logprobs += completion.logprobs
        self.turns.append(Turn(start, len(self.token_ids), text, completion.finish_reason, reward))
        self.versions.append(completion.policy_version)

    def add_step_info(self, info: dict[str, Any], step: StepInfo) -> None:
        """Keep the step's ``info`` (the last one goes to the trajectory); sum its rewards."""
        self.info = info
        for name, value in (step.reward_components or {}).items():
            self.components[name] = self.components.get(name, 0.0) + value

    def finish(self, stop: StopReason, engine: Engine, error: str | None = None) -> Trajectory:
        info = {k: v for k, v in self.info.items() if k not in _NOT_KEPT_INFO}
        if error is not None:
            info["error"] = error
        return Trajectory(
            token_ids=tuple(self.token_ids),
            loss_mask=tuple(self.loss_mask),
            logprobs=tuple(self.logprobs),
            turns=tuple(self.turns),
            reward=sum(turn.reward for turn in self.turns),
            reward_components=self.components,
            stop_reason=stop,
            policy_version=self.versions[0] if self.versions else engine.policy_version,
            turn_policy_versions=tuple(self.versions),
            group_id=self.request.group_id,
            env_id=self.env_id,
            task_id=self.task_id,
            info=info,
            segment_starts=tuple(self.segment_starts),
        )


_NOT_KEPT_INFO = ("tools", "tool_instructions", "reward_components", "stop_reason")
"""Info keys the trajectory records elsewhere (or that only the rollout reads)."""


async def run_episode(
    env: gym.Env,
    engine: Engine,
    renderer: ChatRenderer,
    sampling: SamplingParams,
    request: EpisodeRequest,
    *,
    env_id: str,
    limits: RolloutLimits = RolloutLimits(),
) -> Trajectory:
    """Play one episode within ``limits`` and return it as a trajectory."""
    clock = _Clock(limits.max_episode_s)
    episode = _Episode(request, env_id, task_id=str(request.reset_seed))
    name = f"{env_id} ({type(env.unwrapped).__name__})"
    try:
        messages, info = await _reset(env, request.reset_seed, request.options)
        opening = StepInfo.from_info(info, env=name)
    except Exception as exc:  # an env that cannot start an episode is an infrastructure failure
        return episode.finish(StopReason.ENV_ERROR, engine, _describe(exc))
    if opening.task_id is not None:
        episode.task_id = opening.task_id
    if opening.env_id is not None:  # a mixture of envs names the one it picked
        episode.env_id = opening.env_id
    tools = opening.tools
    messages = renderer.with_tool_instructions(messages, tools, opening.tool_instructions)
    episode.add_prompt(renderer.prompt_ids(messages, tools))
    for turn_index in range(limits.max_turns):
        room = episode.room(limits.max_total_tokens, [], new_sample=False)
        if room < 1:
            return episode.finish(StopReason.MAX_TOKENS, engine)
        try:
            completion = await asyncio.wait_for(
                engine.generate(
                    episode.sample_ids, _turn_sampling(sampling, request, turn_index, room)
                ),
                clock.seconds_left(),
            )
        except Exception as exc:  # an engine failure says nothing about the policy
            if clock.expired():
                return episode.finish(StopReason.TIMEOUT, engine, clock.explain())
            return episode.finish(StopReason.ENGINE_ERROR, engine, _describe(exc))
        text = renderer.decode(list(completion.token_ids))
        messages.append({"role": "assistant", "content": text})
        try:
            observation, reward, terminated, truncated, info = await _step(env, text)
            step = StepInfo.from_info(info, env=name)
            _check_finite_reward(reward, step, env=name)
        except Exception as exc:  # an env crash (or a broken info) is an infrastructure failure
            episode.add_turn(completion, text, 0.0)
            return episode.finish(StopReason.ENV_ERROR, engine, _describe(exc))
        episode.add_turn(completion, text, float(reward))
        episode.add_step_info(info, step)
        reported = None if step.stop_reason is None else StopReason(step.stop_reason.value)
        if reported is not None and reported.is_infra_failure:
            return episode.finish(reported, engine, step.error)
        if terminated or truncated or turn_index == limits.max_turns - 1:
            return episode.finish(_end_reason(completion, reported, terminated), engine)
        if clock.expired():
            return episode.finish(StopReason.TIMEOUT, engine, clock.explain())
        sampled = list(completion.token_ids)
        extension = renderer.continuation_ids(messages, sampled, observation, tools)
        messages += observation
        new_sample = extension is None
        if extension is None:  # the template rewrote history: the rest is a new sample
            extension = renderer.prompt_ids(messages, tools)
        if episode.room(limits.max_total_tokens, extension, new_sample=new_sample) < 1:
            return episode.finish(StopReason.MAX_TOKENS, engine)
        episode.add_prompt(extension, new_sample=new_sample)
    raise AssertionError("unreachable: the last turn always finishes the episode")


def _check_finite_reward(reward: float, step: StepInfo, *, env: str) -> None:
    """Raise ``ValueError`` if the step's reward or a reward component is NaN or inf."""
    parts = {"reward": float(reward)} | dict(step.reward_components or {})
    bad = {name: value for name, value in parts.items() if not math.isfinite(value)}
    if bad:
        raise ValueError(
            f"{env} returned a non-finite reward ({', '.join(f'{k} = {v}' for k, v in bad.items())}"
            "): a reward must be a finite number, so the episode is an env failure, not data"
        )


def _turn_sampling(
    sampling: SamplingParams, request: EpisodeRequest, turn_index: int, room: int
) -> SamplingParams:
    """This turn's sampling: its own seed, and no more tokens than the sample has room for."""
    seed = None if request.sampling_seed is None else request.sampling_seed + turn_index
    return dataclasses.replace(sampling, seed=seed, max_tokens=min(sampling.max_tokens, room))


def _end_reason(
    completion: Completion, reported: StopReason | None, terminated: bool
) -> StopReason:
    """Why an episode that ends after a step ended (infrastructure reasons handled before)."""
    if completion.finish_reason == "length":
        return StopReason.MAX_TOKENS
    if reported is not None:
        return reported
    return StopReason.ANSWERED if terminated else StopReason.MAX_TURNS


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Clock:
    """An episode's wall-clock limit (none when ``limit_s`` is None)."""

    def __init__(self, limit_s: float | None) -> None:
        self.limit_s = limit_s
        self.deadline = None if limit_s is None else time.monotonic() + limit_s

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def explain(self) -> str:
        return f"the episode ran past max_episode_s={self.limit_s:g} s"


_RESERVED = "_palaestra_threads"


def reserve_threads(episodes: int) -> None:
    """Give the running event loop's default executor a thread for each of ``episodes``
    episodes in flight (and a few for the learner and engine calls).

    Envs without native async methods reset and step in that executor's threads (TextEnv's
    ``areset``/``astep``, wrapped envs). Python sizes it by CPU count (6 threads on 2
    cores), so 64 episodes whose tools wait on I/O would queue behind 6 threads; with a
    thread per episode they wait side by side. Grows the executor, never shrinks it.
    """
    loop = asyncio.get_running_loop()
    wanted = episodes + 4
    if getattr(loop, _RESERVED, 0) >= wanted:
        return
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=wanted, thread_name_prefix="palaestra")
    )
    setattr(loop, _RESERVED, wanted)


async def generate_groups(
    pool: EnvPool,
    engine: Engine,
    renderer: ChatRenderer,
    sampling: SamplingParams,
    groups: Sequence[Sequence[EpisodeRequest]],
    *,
    env_id: str,
    limits: RolloutLimits = RolloutLimits(),
) -> AsyncIterator[list[Trajectory]]:
    """Play every episode of ``groups`` concurrently, each within ``limits``; yield each
    group when it completes."""

    reserve_threads(len(pool.envs))

    async def play(request: EpisodeRequest) -> Trajectory:
        async with pool.borrow() as env:
            return await run_episode(
                env, engine, renderer, sampling, request, env_id=env_id, limits=limits
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


def episode_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Counts over finished episodes, for a trainer's or evaluator's log: episodes per stop
    reason (``stop/<reason>``), episodes split by the chat template (``episodes_split``),
    and the tool-call counts of the envs that report them summed (``tools/<count>``)."""
    metrics = {f"stop/{reason.value}": 0.0 for reason in StopReason}
    for trajectory in trajectories:
        metrics[f"stop/{trajectory.stop_reason.value}"] += 1
    metrics["episodes_split"] = float(sum(t.is_split for t in trajectories))
    for trajectory in trajectories:
        for name, count in trajectory.step_info.tool_counts().items():
            metrics[f"tools/{name}"] = metrics.get(f"tools/{name}", 0.0) + count
    return metrics
