"""The trajectory record: what one episode produced, token-first.

A ``Trajectory`` is the only thing that crosses from rollout to trainer. Its token ids are
exactly the ids the engine sampled plus the ids of the prompt and env messages around them;
nothing is decoded and re-encoded on the way. ``loss_mask`` is 1 on sampled tokens only, so
the learner trains on what the policy actually did and never on prompt, tool or env text.

An episode is one token sequence while each turn's prompt extends the previous one token
for token. Where the chat template re-renders earlier turns (templates that strip earlier
reasoning do), the episode *splits*: a new segment starts whose prompt is the whole
conversation rendered afresh (loss mask 0). The segments are stored one after the other in
the same ``token_ids``; ``segment_starts`` says where each begins, and each segment is a
separate training sample (``trainer.batch.collate`` makes one row of each).

Stop reasons are a closed set; four of them are infrastructure failures, which say nothing
about the policy and are kept out of the gradient (counted, never trained as reward 0):

    policy outcomes (trained on)        infrastructure failures (dropped)
    answered     env ended the episode  timeout       the episode's wall-clock limit
    max_turns    turn budget used up    tool_error    a tool hung or its backend failed
    max_tokens   token limit reached    env_error     the env raised (or gave a NaN/inf reward)
    parse_error  unreadable/invalid     engine_error  the engine failed to generate
                 tool call at the end

An env reports the reasons it sees as ``envs.EnvStopReason`` values, each of them a
``StopReason`` value too; the rollout adds the rest.

This module holds records only: no tokenizer, no torch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from palaestra.envs.step_info import StepInfo


class StopReason(str, enum.Enum):
    """Why an episode ended. Infrastructure failures are kept out of the gradient."""

    ANSWERED = "answered"
    """The env terminated the episode (the model gave its final answer)."""
    MAX_TURNS = "max_turns"
    """The env or the rollout truncated the episode after its turn budget."""
    MAX_TOKENS = "max_tokens"
    """The last completion hit its token limit before the model ended its turn, or the
    episode's token budget (``max_total_tokens``) left no room for another turn."""
    PARSE_ERROR = "parse_error"
    """The episode ended right after a message whose tool call could not be read, named no
    tool, or had arguments the tool's schema refuses: a policy failure."""
    TIMEOUT = "timeout"
    """The episode ran past its wall-clock limit (``max_episode_s``). Infrastructure: wall
    time measures the machine's load; what the policy controls (turns, tokens) has its own
    limits above."""
    TOOL_ERROR = "tool_error"
    """A tool failed for infrastructure reasons (it hung past its time limit, or raised
    ``ToolInfraError``): not the policy's doing. A tool that rejects the model's input is an
    observation the model reads, not a stop reason."""
    ENV_ERROR = "env_error"
    """The env raised while resetting or stepping, or returned a NaN or infinite reward: an
    infrastructure failure."""
    ENGINE_ERROR = "engine_error"
    """The engine failed to generate (its process died, a request failed): an
    infrastructure failure."""

    @property
    def is_infra_failure(self) -> bool:
        """True when the episode says nothing about the policy and must not be trained on."""
        return self in _INFRA_FAILURES


_INFRA_FAILURES = frozenset(
    {StopReason.TIMEOUT, StopReason.TOOL_ERROR, StopReason.ENV_ERROR, StopReason.ENGINE_ERROR}
)


@dataclass(frozen=True)
class Turn:
    """One assistant turn inside a trajectory's token sequence."""

    start: int
    """Index in ``token_ids`` of the first sampled token of this turn."""
    end: int
    """Index one past the last sampled token of this turn."""
    text: str
    """The decoded completion text, as the env received it (for logs and readers only)."""
    finish_reason: str
    """The engine's finish reason for this completion: ``"stop"`` or ``"length"``."""
    reward: float = 0.0
    """The reward of the env step this turn was the action of (0 if the env never stepped)."""


@dataclass(frozen=True)
class Trajectory:
    """One episode as token sequences (one per segment) with its loss mask and rewards."""

    token_ids: tuple[int, ...]
    """Prompt, sampled and env tokens in order; the segments one after the other."""
    loss_mask: tuple[int, ...]
    """1 on tokens the model sampled, 0 on prompt, tool and env tokens."""
    logprobs: tuple[float, ...]
    """Behaviour-policy logprob of each sampled token; 0.0 where ``loss_mask`` is 0."""
    turns: tuple[Turn, ...]
    """The spans of sampled tokens, one per assistant turn."""
    reward: float
    """Total episode reward: the sum of the turns' step rewards."""
    reward_components: dict[str, float]
    """Named parts of the reward, summed over steps (e.g. ``correct``, ``format``)."""
    stop_reason: StopReason
    """Why the episode ended."""
    policy_version: int
    """Engine weight version that sampled the first turn (the oldest, for staleness)."""
    group_id: int
    """Trajectories with the same ``group_id`` answer the same task (GRPO groups)."""
    env_id: str
    """Registered id of the env that produced this episode."""
    task_id: str
    """The env's name for the task, stable across seeds."""
    info: dict[str, Any] = field(default_factory=dict)
    """The env's last ``info``, less the keys recorded above (and ``tools``,
    ``tool_instructions``); ``error`` holds an infrastructure failure's text. Read it typed
    with ``step_info``."""
    turn_policy_versions: tuple[int, ...] = ()
    """The engine weight version that sampled each turn, in order: a multi-turn episode can
    span a weight sync."""
    segment_starts: tuple[int, ...] = (0,)
    """Index in ``token_ids`` where each training sample begins; ``(0,)`` unless the chat
    template forced a split. Each segment begins with its prompt (loss mask 0)."""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"Trajectory fields disagree in length: token_ids={n}, "
                f"loss_mask={len(self.loss_mask)}, logprobs={len(self.logprobs)}"
            )
        starts = self.segment_starts
        rising = bool(starts) and starts[0] == 0 and all(a < b for a, b in pairwise(starts))
        if not rising or (len(starts) > 1 and starts[-1] >= n):
            raise ValueError(
                f"segment_starts must rise strictly from 0 and stay inside the {n} tokens, "
                f"got {starts}"
            )
        if any(self.loss_mask[s] for s in starts[1:]):
            raise ValueError(f"a split segment must begin with its prompt (loss mask 0): {starts}")

    @property
    def step_info(self) -> StepInfo:
        """``info`` read as a ``StepInfo`` (``success``, ``category``, tool-call counts, ...)."""
        return StepInfo.from_info(self.info, env=self.env_id)

    @property
    def num_sampled_tokens(self) -> int:
        """How many tokens the model sampled in this episode."""
        return sum(self.loss_mask)

    @property
    def sampled_token_ids(self) -> list[int]:
        """The sampled token ids, in order (what the loss trains on)."""
        return [t for t, m in zip(self.token_ids, self.loss_mask, strict=True) if m]

    @property
    def is_split(self) -> bool:
        """Whether the chat template forced this episode into more than one training sample."""
        return len(self.segment_starts) > 1

    @property
    def segments(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each training sample in ``token_ids``, in order."""
        ends = [*self.segment_starts[1:], len(self.token_ids)]
        return list(zip(self.segment_starts, ends, strict=True))

    def turn_returns_to_go(self) -> tuple[float, ...]:
        """Per turn ``k``: the sum of the step rewards of turns ``k`` and later (undiscounted)."""
        out: list[float] = []
        to_go = 0.0
        for turn in reversed(self.turns):
            to_go += turn.reward
            out.append(to_go)
        return tuple(reversed(out))

    def per_token(self, turn_values: Sequence[float]) -> tuple[float, ...]:
        """One value per turn spread over that turn's sampled tokens; 0.0 on prompt, tool
        and env tokens."""
        if len(turn_values) != len(self.turns):
            raise ValueError(f"{len(turn_values)} values for {len(self.turns)} turns")
        out = [0.0] * len(self.token_ids)
        for turn, value in zip(self.turns, turn_values, strict=True):
            out[turn.start : turn.end] = [value] * (turn.end - turn.start)
        return tuple(out)

    def returns_to_go(self) -> tuple[float, ...]:
        """Per token: on a sampled token of turn ``k``, the sum of the step rewards of turns
        ``k`` and later (undiscounted); 0.0 on prompt, tool and env tokens."""
        return self.per_token(self.turn_returns_to_go())
