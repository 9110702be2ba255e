"""The trajectory record: what one episode produced, token-first.

A ``Trajectory`` is the only thing that crosses from rollout to trainer. Its token ids are
exactly the ids the engine sampled plus the ids of the prompt and env messages around them;
nothing is decoded and re-encoded on the way. ``loss_mask`` is 1 on sampled tokens only, so
the learner trains on what the policy actually did and never on prompt, tool or env text.

This module holds records only: no tokenizer, no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class StopReason(str, enum.Enum):
    """Why an episode ended. Infrastructure failures are kept out of the gradient."""

    ANSWERED = "answered"
    """The env terminated the episode (the model gave its final answer)."""
    MAX_TURNS = "max_turns"
    """The env or the rollout truncated the episode after its turn budget."""
    MAX_TOKENS = "max_tokens"
    """A completion hit the token limit before the model ended its turn."""
    ENV_ERROR = "env_error"
    """The env raised while stepping: an infrastructure failure, not a policy failure."""
    ENGINE_ERROR = "engine_error"
    """The engine failed to generate: an infrastructure failure, not a policy failure."""

    @property
    def is_infra_failure(self) -> bool:
        """True when the episode says nothing about the policy and must not be trained on."""
        return self in (StopReason.ENV_ERROR, StopReason.ENGINE_ERROR)


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


@dataclass(frozen=True)
class Trajectory:
    """One episode as a single token sequence with its loss mask and rewards."""

    token_ids: tuple[int, ...]
    """Prompt, sampled and env tokens in order."""
    loss_mask: tuple[int, ...]
    """1 on tokens the model sampled, 0 on prompt, tool and env tokens."""
    logprobs: tuple[float, ...]
    """Behaviour-policy logprob of each sampled token; 0.0 where ``loss_mask`` is 0."""
    turns: tuple[Turn, ...]
    """The spans of sampled tokens, one per assistant turn."""
    reward: float
    """Total episode reward (sum of step rewards)."""
    reward_components: dict[str, float]
    """Named parts of the reward, summed over steps (e.g. ``correct``, ``format``)."""
    stop_reason: StopReason
    """Why the episode ended."""
    policy_version: int
    """Engine weight version that sampled the first turn."""
    group_id: int
    """Trajectories with the same ``group_id`` answer the same task (GRPO groups)."""
    env_id: str
    """Registered id of the env that produced this episode."""
    task_id: str
    """The env's name for the task, stable across seeds."""
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form extras from the env's last ``info`` (not used by the trainer)."""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"Trajectory fields disagree in length: token_ids={n}, "
                f"loss_mask={len(self.loss_mask)}, logprobs={len(self.logprobs)}"
            )

    @property
    def num_sampled_tokens(self) -> int:
        """How many tokens the model sampled in this episode."""
        return sum(self.loss_mask)

    @property
    def sampled_token_ids(self) -> list[int]:
        """The sampled token ids, in order (what the loss trains on)."""
        return [t for t, m in zip(self.token_ids, self.loss_mask, strict=True) if m]
