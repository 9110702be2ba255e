"""GRPO stage: sample groups, score them relative to each other, take a clipped step.

Also DAPO, Dr.GRPO, GSPO, RLOO and REINFORCE++: they differ by the ``grpo`` section's
options, not by code. The loop (collect, filter, sync, log, evaluate) is
``stages.onpolicy``; this module is its update, top to bottom:

1. **batch**: the step's trajectories, longest first (less padding), one row per training
   sample (``batch.collate``).
2. **rewards**: with a KL coefficient and ``kl_placement: reward``, subtract
   ``kl_coef * KL(policy || reference)`` from each episode's reward; with
   ``overlong_buffer``, DAPO's soft overlong punishment.
3. **advantages**: centre rewards within each group (and divide by the group's std unless
   Dr.GRPO's ``scale_by_std: false``), or RLOO / REINFORCE++; with ``turn_credit:
   return_to_go``, each turn's return against the group's mean at that turn. They are set
   on the batch once, per token.
4. **learner.step**: token-level clipped surrogate over the sampled tokens; with
   ``importance_sampling`` on (the default) it clips against the learner's own logprobs
   before the step and weighs tokens by the truncated ratio learner / engine, which
   corrects both for staleness and for engine numerics.
"""

from __future__ import annotations

import dataclasses

import torch

from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.config import GRPOStage
from palaestra.rundir import RunDir
from palaestra.trainer.advantages import (
    grouped_advantages,
    grouped_turn_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)
from palaestra.trainer.batch import TokenBatch, collate
from palaestra.trainer.learner import Learner
from palaestra.trainer.policy_gradient import (
    corrected_step,
    kl_in_reward_BT,
    loss_settings,
    policy_loss_fn,
    with_reference,
)
from palaestra.trainer.stages.common import StageResult, reference_policy
from palaestra.trainer.stages.onpolicy import Policy, run_on_policy


def run_grpo(cfg: GRPOStage, run: RunDir) -> StageResult:
    """Run a GRPO stage as configured, writing into ``run``."""
    return run_on_policy(
        cfg, run, lambda policy: GRPOUpdate(cfg, policy), dynamic_sampling=cfg.grpo
    )


class GRPOUpdate:
    """Group-relative advantages and one clipped learner step per training step."""

    def __init__(self, cfg: GRPOStage, policy: Policy) -> None:
        self.cfg, self.policy = cfg, policy
        self.reference = reference_policy(policy.model) if cfg.grpo.kl_coef > 0 else None
        self.loss = policy_loss_fn(loss_settings(cfg, cfg.grpo))

    def __call__(self, trajectories: list[Trajectory]) -> dict[str, float]:
        g, learner = self.cfg.grpo, self.policy.learner
        trajectories = sorted(trajectories, key=lambda tr: -len(tr.token_ids))
        batch = collate(trajectories, pad_id=self.policy.tokenizer.pad_token_id)
        batch = with_reference(learner, self.reference, batch)
        rewards_E, metrics = self._rewards(batch, trajectories)
        batch = self._with_advantages(batch, trajectories, rewards_E)
        if g.overlong_filter:
            batch = _without_truncated(batch, trajectories)
        return corrected_step(g, learner, batch, self.loss) | metrics

    def finish(self, run: RunDir) -> None:
        """GRPO owns nothing besides the policy."""

    def learners(self) -> dict[str, Learner]:
        """None besides the policy's."""
        return {}

    def _rewards(
        self, batch: TokenBatch, trajectories: list[Trajectory]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Each episode's reward, KL-penalised and overlong-punished as configured."""
        g, r = self.cfg.grpo, self.cfg.rollout
        rewards_E = torch.tensor([tr.reward for tr in trajectories])
        metrics: dict[str, float] = {}
        if self.reference is not None and g.kl_placement == "reward":
            penalty_BT, metrics = kl_in_reward_BT(batch, g)
            rewards_E = rewards_E + batch.sum_per_episode(penalty_BT.sum(-1), len(trajectories))
        if g.overlong_buffer:
            lengths_E = torch.tensor([tr.num_sampled_tokens for tr in trajectories])
            max_length = r.max_tokens * r.max_turns
            penalty_E = overlong_penalty(
                lengths_E,
                max_length=max_length,
                buffer=min(g.overlong_buffer, max_length),
                factor=g.overlong_penalty,
            )
            rewards_E = rewards_E + penalty_E
            metrics["reward/overlong_penalty"] = float(penalty_E.mean())
        return rewards_E, metrics

    def _with_advantages(
        self, batch: TokenBatch, trajectories: list[Trajectory], rewards_E: torch.Tensor
    ) -> TokenBatch:
        """``batch`` with the configured advantage on every sampled token."""
        g = self.cfg.grpo
        group_ids = torch.tensor([tr.group_id for tr in trajectories])
        if g.turn_credit == "return_to_go":
            returns = [tr.turn_returns_to_go() for tr in trajectories]
            per_turn = grouped_turn_advantages(returns, group_ids, scale_by_std=g.scale_by_std)
            values = [
                tr.per_token(a.tolist()) for tr, a in zip(trajectories, per_turn, strict=True)
            ]
            return batch.with_token_advantages(trajectories, values)
        if g.advantage == "rloo":
            advantages_E = rloo_advantages(rewards_E, group_ids)
        elif g.advantage == "reinforce_pp":
            advantages_E = reinforce_pp_advantages(rewards_E, group_ids)
        else:
            advantages_E = grouped_advantages(rewards_E, group_ids, scale_by_std=g.scale_by_std)
        return batch.with_episode_advantages(advantages_E)


def _without_truncated(batch: TokenBatch, trajectories: list[Trajectory]) -> TokenBatch:
    """The batch with the loss masked on episodes cut at the token limit (unless that is
    every episode: then nothing would be left to train on, and the batch stays whole)."""
    assert batch.episode_B is not None  # collated
    truncated_E = torch.tensor([tr.stop_reason is StopReason.MAX_TOKENS for tr in trajectories])
    keep_B = ~truncated_E[batch.episode_B]
    if not keep_B.any():
        return batch
    return dataclasses.replace(batch, loss_mask_BT=batch.loss_mask_BT * keep_B[:, None])
