"""Learned rewards: a reward model scores finished episodes of any env (the RLHF path).

A ``reward_model`` stage trains a Bradley-Terry model on preference pairs; its checkpoint
is a sequence classifier with one output, read at the last token of the conversation.
``LearnedReward`` wraps an env so that, when an episode ends, the whole conversation
(prompt, every assistant turn, every env message) is scored by that model and the score
replaces the env's reward (``mode="replace"``) or is added to it (``mode="add"``), times
``weight``. The env's own reward components stay in ``info["reward_components"]`` beside
``learned``, so its true success stays visible in the logs.

Reward hacking: the policy is optimised against the reward model, not against the task,
and it finds the model's errors: answers that look preferred (longer, more confident, the
right format around a wrong number) without being right. Training reward then rises while
real success does not. palaestra evaluates the held-out split on the env's OWN reward,
never the learned one, so this shows as training reward rising and held-out accuracy
flat or falling. Keep a KL penalty to the reference (``grpo.kl_coef``), watch held-out
accuracy, stop early, and retrain the reward model on fresh samples of the current policy.

A scorer that fails raises: the rollout ends the episode as ``env_error``, an
infrastructure failure kept out of the gradient, never a reward of 0.

What this module does not do: train the reward model (``trainer.stages.reward_model``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Protocol

import gymnasium as gym
import torch

from palaestra.envs.core import Messages
from palaestra.envs.step_info import StepInfo


class ConversationScorer(Protocol):
    """Scores whole conversations; higher is better."""

    def score(self, conversations: Sequence[Messages]) -> list[float]: ...


def last_token_scores(
    model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor
) -> torch.Tensor:
    """One score per right-padded row: the classifier head (``model.score``) applied to the
    decoder's hidden state at the row's last real token, shape ``(B,)``."""
    hidden_BTH = model.base_model(  # type: ignore[operator]
        input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False
    ).last_hidden_state
    last_B = attention_mask_BT.sum(dim=1) - 1
    hidden_BH = hidden_BTH[torch.arange(len(last_B)), last_B]
    return model.score(hidden_BH).squeeze(-1).float()  # type: ignore[operator]


def encode_conversations(
    tokenizer: Any, conversations: Sequence[Messages], max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids_BT, attention_mask_BT)`` of whole conversations rendered
    with the chat template; a conversation over ``max_length`` tokens loses its START, so
    the score still reads its end. Training and scoring both tokenise through here."""
    texts = [
        str(tokenizer.apply_chat_template([dict(m) for m in c], tokenize=False))
        for c in conversations
    ]
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    if max_length is not None:
        rows = [r[-max_length:] for r in rows]
    width = max(len(r) for r in rows)
    ids_BT = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids_BT[b, : len(row)] = torch.tensor(row)
        mask_BT[b, : len(row)] = 1
    return ids_BT, mask_BT


class RewardModelScorer:
    """A reward model checkpoint as a ``ConversationScorer`` (thread-safe, no grad)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 8) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size
        self._lock = threading.Lock()

    def score(self, conversations: Sequence[Messages]) -> list[float]:
        out: list[float] = []
        with self._lock, torch.no_grad():
            for start in range(0, len(conversations), self.batch_size):
                ids_BT, mask_BT = encode_conversations(
                    self.tokenizer, conversations[start : start + self.batch_size]
                )
                scores_B = last_token_scores(
                    self.model, ids_BT.to(self.device), mask_BT.to(self.device)
                )
                out += scores_B.tolist()
        return out


class LearnedReward(gym.Wrapper):
    """Scores each finished episode with a ``ConversationScorer`` (see the module doc)."""

    def __init__(
        self,
        env: gym.Env,
        scorer: ConversationScorer,
        *,
        mode: Literal["replace", "add"] = "replace",
        weight: float = 1.0,
    ) -> None:
        super().__init__(env)
        if mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}")
        self.scorer, self.mode, self.weight = scorer, mode, weight
        self._conversation: list[Any] = []

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        observation, info = self.env.reset(**kwargs)
        self._conversation = list(observation)
        return observation, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        self._conversation += [{"role": "assistant", "content": action}, *observation]
        if terminated or truncated:
            learned = self.weight * self.scorer.score([self._conversation])[0]
            step = StepInfo.from_info(info, env=type(self.env.unwrapped).__name__)
            components = step.reward_components or {"env": float(reward)}
            info = replace(step, reward_components={**components, "learned": learned}).to_info()
            reward = learned if self.mode == "replace" else float(reward) + learned
        return observation, float(reward), terminated, truncated, info
