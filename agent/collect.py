"""Collect SFT data by playing episodes: the env's scripted expert, or a model, as the policy.

``collect`` plays ``episodes`` episodes of an env and returns them as ``CollectedEpisode``s,
each of which becomes one SFT record (``to_record``) in the ``{"messages": [...]}`` format
``trainer.data.read_sft`` reads::

    {"messages": [system, user, assistant, tool, ..., assistant], "tools": [...],
     "env_id": "palaestra/ToolLookup-v0", "task_id": "...", "reward": 1.0}

The policy is either ``ORACLE``, the env's scripted solver (``envs.solver``: each assistant
message is the env's ``expert_action()``), or an ``Engine`` (a model), played through the
real rollout (``agent.rollout.run_episode``). With a model and ``Keep.SUCCESS`` this is
rejection sampling, or one round of expert iteration on the model's own successful episodes.

The records hold the conversation exactly as the rollout builds it: the env's opening
messages with the tool instructions the renderer adds for templates that ignore ``tools=``
(``ChatRenderer.with_tool_instructions``), then each assistant message and the env's
observation messages (tool results as ``role: tool`` messages, as the env's tool-call format
writes them). Rendered with the chat template by ``trainer.data.ChatEncoder``, a record gives
the token ids the rollout produced, with the loss mask on the assistant tokens only (tested
in ``tests/agent/test_collect.py``).

Limits of that equality, each a property of the data, not of this module:

- SFT data is text: a model episode whose sampled ids are not the tokenizer's own encoding
  of their text (rare; a model may sample a word in unusual pieces) re-encodes to the
  canonical ids, and a turn cut at its token limit is closed with the end-of-turn token.
- ``ChatEncoder`` renders without ``tools=``: for a template that renders tool schemas
  itself (the renderer then adds no instructions), the SFT prompt lacks the schemas the
  rollout showed. The record keeps them in ``"tools"`` for an encoder that passes them.
- A template that rewrites history splits rollouts into samples; ``ChatEncoder`` refuses it.

Episodes run on seeded task draws: episode ``i`` resets with seed ``seed + i``, so a large
collection may repeat tasks. Infrastructure failures (``StopReason.is_infra_failure``) are
never kept.

What this module does not do: train (``trainer.stages.sft``), write files other than JSON
lines, or choose tasks by index.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym

from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.errors import NoSolverError, RolloutConfigError
from palaestra.agent.evaluate import env_turn_limit, judged_success
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import (
    EnvPool,
    EpisodeRequest,
    RolloutLimits,
    reserve_threads,
    run_episode,
)
from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.envs.core import Message, Messages
from palaestra.envs.solver import ScriptedSolver, solver_of
from palaestra.envs.step_info import StepInfo

ORACLE: Literal["oracle"] = "oracle"
"""The policy that plays the env's scripted solver (``expert_action``)."""
Policy = Engine | Literal["oracle"]


class Keep(str, enum.Enum):
    """Which played episodes become SFT records."""

    SUCCESS = "success"
    """Episodes that solved their task (``info["success"]``, else a positive reward)."""
    ALL = "all"
    """Every episode but infrastructure failures."""


@dataclass(frozen=True)
class CollectedEpisode:
    """One played episode as a conversation, ready to be written as an SFT record."""

    messages: Messages
    """The conversation as the rollout renders it: opening messages (with the tool
    instructions the renderer adds), then assistant and observation messages."""
    tools: list[dict[str, Any]] | None
    """The env's tool specs, as the rollout passed them to the template (None: no tools)."""
    env_id: str
    """The env's registered id."""
    task_id: str
    """The env's name for the task."""
    reward: float
    """The episode's total reward."""
    success: bool
    """Whether the episode solved its task."""
    stop_reason: StopReason
    """Why the episode ended."""
    trajectory: Trajectory | None = None
    """The rollout's token record of a model episode; None for the oracle."""

    def to_record(self) -> dict[str, Any]:
        """The SFT record: ``messages`` (what ``read_sft`` trains on), ``tools`` where the
        env has any, and ``env_id``, ``task_id``, ``reward`` for provenance."""
        record: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            record["tools"] = self.tools
        return record | {"env_id": self.env_id, "task_id": self.task_id, "reward": self.reward}


@dataclass(frozen=True)
class Collection:
    """Every episode one ``collect`` call played, and which of them to keep."""

    episodes: tuple[CollectedEpisode, ...]
    """Every episode played, in order."""
    keep: Keep
    """Which of them become records."""

    @property
    def kept(self) -> list[CollectedEpisode]:
        """The episodes ``keep`` selects; never an infrastructure failure."""
        usable = [e for e in self.episodes if not e.stop_reason.is_infra_failure]
        return usable if self.keep is Keep.ALL else [e for e in usable if e.success]

    @property
    def success_rate(self) -> float:
        """Solved episodes over every episode played (infrastructure failures included)."""
        return sum(e.success for e in self.episodes) / len(self.episodes) if self.episodes else 0.0

    def summary(self) -> str:
        """One line: episodes played and kept, success rate, infrastructure failures."""
        failures = sum(e.stop_reason.is_infra_failure for e in self.episodes)
        return (
            f"played {len(self.episodes)} episodes, kept {len(self.kept)} ({self.keep.value}), "
            f"success rate {self.success_rate:.3f}, infrastructure failures {failures}"
        )


async def collect(
    make_env: Callable[[], gym.Env],
    policy: Policy,
    renderer: ChatRenderer,
    *,
    env_id: str,
    episodes: int,
    keep: Keep = Keep.SUCCESS,
    seed: int = 0,
    limits: RolloutLimits | None = None,
    sampling: SamplingParams = SamplingParams(),  # noqa: B008 (frozen, so safe to share)
    concurrency: int = 16,
) -> Collection:
    """Play ``episodes`` episodes of the env ``make_env`` builds with ``policy``.

    ``limits`` default to the env's own turn limit (one turn for an env without one);
    ``sampling`` and ``concurrency`` (episodes in flight, one env each) apply to a model.
    The oracle plays one episode at a time in a worker thread. Raises ``NoSolverError``
    for the oracle on an env without ``expert_action``.
    """
    if episodes < 1:
        raise RolloutConfigError(f"episodes must be >= 1, got {episodes}")
    env = make_env()
    try:
        limits = limits or RolloutLimits(max_turns=env_turn_limit(env) or 1)
        if isinstance(policy, str):  # ORACLE, the only string a Policy may be
            seeds = range(seed, seed + episodes)
            played = await asyncio.to_thread(
                _play_oracle_episodes, env, renderer, env_id, seeds, limits
            )
            return Collection(tuple(played), keep)
    finally:
        env.close()
    pool = EnvPool(make_env, min(concurrency, episodes))
    reserve_threads(len(pool.envs))

    async def play(i: int) -> CollectedEpisode:
        request = EpisodeRequest(i, seed + i, sampling_seed=_sampling_seed(sampling, seed, i))
        async with pool.borrow() as borrowed:
            return await play_model(
                borrowed, policy, renderer, sampling, request, env_id=env_id, limits=limits
            )

    try:
        return Collection(tuple(await asyncio.gather(*map(play, range(episodes)))), keep)
    finally:
        pool.close()


def _sampling_seed(sampling: SamplingParams, seed: int, episode: int) -> int | None:
    """Episode ``episode``'s sampling seed (turn ``k`` adds ``k``); None when greedy."""
    return None if sampling.temperature == 0 else 1000 * (seed + episode)


def _play_oracle_episodes(
    env: gym.Env, renderer: ChatRenderer, env_id: str, seeds: range, limits: RolloutLimits
) -> list[CollectedEpisode]:
    solver = solver_of(env)
    if solver is None:
        raise NoSolverError(
            f"{env_id} ({type(env.unwrapped).__name__}) has no scripted solver, so the oracle "
            "cannot play it: give the env an expert_action() method (see envs/solver.py), or "
            "collect with a model as the policy"
        )
    return [
        play_oracle(env, solver, renderer, env_id=env_id, seed=s, max_turns=limits.max_turns)
        for s in seeds
    ]


def play_oracle(
    env: gym.Env,
    solver: ScriptedSolver,
    renderer: ChatRenderer,
    *,
    env_id: str,
    seed: int,
    max_turns: int,
) -> CollectedEpisode:
    """One episode of ``solver`` (the env itself, ``envs.solver_of(env)``) within
    ``max_turns`` assistant turns, the conversation kept as the rollout would build it."""
    messages, info = env.reset(seed=seed)
    opening = StepInfo.from_info(info, env=env_id)
    conversation = renderer.with_tool_instructions(
        messages, opening.tools, opening.tool_instructions
    )
    reward, terminated, truncated = 0.0, False, False
    for _ in range(max_turns):
        action = solver.expert_action()
        observation, step_reward, terminated, truncated, info = env.step(action)
        reward += float(step_reward)
        conversation.append(Message(role="assistant", content=action))
        if terminated or truncated:
            break
        conversation += observation
    step = StepInfo.from_info(info, env=env_id)
    reported = None if step.stop_reason is None else StopReason(step.stop_reason.value)
    stop = reported or (StopReason.ANSWERED if terminated else StopReason.MAX_TURNS)
    return CollectedEpisode(
        messages=conversation,
        tools=opening.tools,
        env_id=env_id,
        task_id=opening.task_id or str(seed),
        reward=reward,
        success=judged_success(reward, step.success),
        stop_reason=stop,
    )


async def play_model(
    env: gym.Env,
    engine: Engine,
    renderer: ChatRenderer,
    sampling: SamplingParams,
    request: EpisodeRequest,
    *,
    env_id: str,
    limits: RolloutLimits,
) -> CollectedEpisode:
    """One episode of ``engine`` through the real rollout (``agent.rollout.run_episode``),
    with the env's messages recorded to rebuild the conversation the rollout rendered."""
    recorder = _Recorder(env)
    trajectory = await run_episode(
        recorder, engine, renderer, sampling, request, env_id=env_id, limits=limits
    )
    opening = StepInfo.from_info(recorder.opening_info, env=env_id)
    conversation = renderer.with_tool_instructions(
        recorder.opening, opening.tools, opening.tool_instructions
    )
    for i, turn in enumerate(trajectory.turns):
        conversation.append(Message(role="assistant", content=turn.text))
        if i + 1 < len(trajectory.turns):  # the model never saw the last step's messages
            conversation += recorder.observations[i]
    return CollectedEpisode(
        messages=conversation,
        tools=opening.tools,
        env_id=trajectory.env_id,
        task_id=trajectory.task_id,
        reward=trajectory.reward,
        success=judged_success(trajectory.reward, trajectory.step_info.success),
        stop_reason=trajectory.stop_reason,
        trajectory=trajectory,
    )


class _Recorder(gym.Wrapper):
    """Passes everything through, keeping the opening messages and info and each step's
    observation messages (the rollout keeps only tokens)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.opening: Messages = []
        self.opening_info: dict[str, Any] = {}
        self.observations: list[Messages] = []

    def reset(self, **kwargs: Any) -> tuple[Messages, dict[str, Any]]:
        messages, info = self.env.reset(**kwargs)
        self.opening, self.opening_info, self.observations = list(messages), info, []
        return messages, info

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.observations.append(list(observation))
        return observation, float(reward), terminated, truncated, info


def write_records(path: str | Path, episodes: Sequence[CollectedEpisode]) -> int:
    """Write each episode's SFT record as one JSON line of ``path``; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for episode in episodes:
            out.write(json.dumps(episode.to_record(), ensure_ascii=False) + "\n")
    return len(episodes)
