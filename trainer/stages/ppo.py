"""PPO stage: the policy-gradient loop of ``stages.grpo`` with a learned critic.

Rollouts, infrastructure-failure filtering, weight sync, logging and evaluation are the
GRPO stage's (``grpo.run_policy_gradient``); this module replaces steps 3-5, top to bottom:

1. **values**: the critic (``trainer.critic``) values every sampled token of the batch as
   it is now (the "old" values the value loss clips against).
2. **rewards**: each turn's env reward on its last sampled token; with ``grpo.kl_coef``
   and ``kl_placement: reward``, ``kl_coef * KL`` subtracted on every sampled token
   (classic RLHF PPO).
3. **GAE** (``advantages.gae``, ``ppo.gamma``, ``ppo.lam``) over each episode's sampled
   tokens in order, across tool replies and across the samples of a split episode, so
   values and advantages live on model tokens only; whitened over the batch's sampled
   tokens (``ppo.whiten_advantages``).
4. **policy step**: the clipped surrogate (``losses.policy_loss``) with per-token
   advantages, with the ``grpo`` section's clip range, aggregation, KL-in-loss and
   importance-sampling settings; skipped during ``ppo.critic_warmup_steps``.
5. **critic step**: the clipped value loss (``losses.value_loss``, ``ppo.value_clip``) on
   the GAE returns, AdamW at ``ppo.critic_lr``.

The critic is saved next to the policy as ``checkpoints/critic-final``.
"""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from palaestra.agent.trajectory import Trajectory
from palaestra.config import TrainConfig
from palaestra.rundir import RunDir
from palaestra.trainer.advantages import gae
from palaestra.trainer.batch import collate, rows_of_token_values, token_values_of_rows
from palaestra.trainer.critic import Critic, CriticLearner
from palaestra.trainer.losses import kl_estimate
from palaestra.trainer.stages.common import StageResult
from palaestra.trainer.stages.grpo import (
    Parts,
    behaviour_correction,
    policy_loss_fn,
    run_policy_gradient,
)


def run_ppo(cfg: TrainConfig, run: RunDir) -> StageResult:
    """Run a PPO stage as configured, writing into ``run``."""
    torch.manual_seed(cfg.seed)
    critic = Critic.from_pretrained(cfg.ppo.critic_model or cfg.model, device=cfg.device)
    critic_learner = CriticLearner(
        critic,
        lr=cfg.ppo.critic_lr,
        clip=cfg.ppo.value_clip,
        max_grad_norm=cfg.trainer.max_grad_norm,
        micro_batch_size=cfg.trainer.micro_batch_size,
        dtype=cfg.trainer.dtype,
    )

    def learn(cfg: TrainConfig, parts: Parts, trajectories: list[Trajectory]) -> dict[str, float]:
        return _learn(cfg, parts, critic_learner, trajectories)

    result = asyncio.run(run_policy_gradient(cfg, run, learn))
    critic.save(run.checkpoints / "critic-final")
    return result


def _learn(
    cfg: TrainConfig, parts: Parts, critic: CriticLearner, trajectories: list[Trajectory]
) -> dict[str, float]:
    trajectories = sorted(trajectories, key=lambda tr: -len(tr.token_ids))  # less padding
    batch = collate(trajectories, [0.0] * len(trajectories), pad_id=parts.tokenizer.pad_token_id)
    # 1. values now
    old_values_BT = critic.values(batch)
    # 2. per-token rewards
    rewards = [_turn_end_rewards(tr) for tr in trajectories]
    metrics: dict[str, float] = {}
    if parts.reference is not None:
        ref_BT = parts.learner.score(parts.reference, batch)
        batch = batch.with_ref_logprobs(ref_BT)
        if cfg.grpo.kl_placement == "reward":
            kl_BT = (
                kl_estimate(batch.old_logprobs_BT, ref_BT, cfg.grpo.kl_estimator)
                * batch.loss_mask_BT
            )
            penalty = token_values_of_rows(trajectories, -cfg.grpo.kl_coef * kl_BT)
            rewards = [
                [r + p for r, p in zip(rs, ps, strict=True)]
                for rs, ps in zip(rewards, penalty, strict=True)
            ]
            metrics["kl_per_seq"] = float(kl_BT.sum() / len(trajectories))
    # 3. GAE per episode, over its sampled tokens in order
    values = token_values_of_rows(trajectories, old_values_BT)
    advantages, returns = [], []
    for tr, r, v in zip(trajectories, rewards, values, strict=True):
        a_1T, g_1T = gae(
            torch.tensor([r]),
            torch.tensor([v]),
            torch.tensor([tr.loss_mask]),
            gamma=cfg.ppo.gamma,
            lam=cfg.ppo.lam,
        )
        advantages.append(a_1T[0].tolist())
        returns.append(g_1T[0].tolist())
    advantages_BT = rows_of_token_values(trajectories, advantages)
    returns_BT = rows_of_token_values(trajectories, returns)
    sampled = batch.loss_mask_BT.bool()
    if cfg.ppo.whiten_advantages and sampled.sum() > 1:
        a = advantages_BT[sampled]
        advantages_BT = torch.where(sampled, (advantages_BT - a.mean()) / (a.std() + 1e-8), 0.0)
    metrics |= {
        "advantages/mean": float(advantages_BT[sampled].mean()),
        "advantages/std": float(advantages_BT[sampled].std()) if sampled.sum() > 1 else 0.0,
        "returns/mean": float(returns_BT[sampled].mean()),
        "values/mean": float(old_values_BT[sampled].mean()),
    }
    # 4. policy step (not while the critic warms up)
    if critic.steps >= cfg.ppo.critic_warmup_steps:
        policy_batch = dataclasses.replace(batch, token_advantages_BT=advantages_BT)
        policy_batch, mismatch = behaviour_correction(cfg, parts.learner, policy_batch)
        metrics |= parts.learner.step(policy_batch, policy_loss_fn(cfg)) | mismatch
    else:
        metrics["critic/warmup"] = 1.0
    # 5. critic step
    return metrics | critic.step(batch, returns_BT, old_values_BT)


def _turn_end_rewards(trajectory: Trajectory) -> list[float]:
    """Each turn's env reward on its last sampled token; 0 elsewhere."""
    out = [0.0] * len(trajectory.token_ids)
    for turn in trajectory.turns:
        if turn.end > turn.start:
            out[turn.end - 1] += turn.reward
    return out
