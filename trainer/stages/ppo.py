"""PPO stage: the on-policy loop (``stages.onpolicy``) with a learned critic.

Rollouts, infrastructure-failure filtering, weight sync, logging and evaluation are the
loop's; this module is its update, top to bottom:

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
   the GAE returns, through a second ``Learner`` at ``ppo.critic_lr``.

The critic is saved next to the policy as ``checkpoints/critic-final``, and in every
training-state checkpoint (``critic.pt`` and its optimizer state) so a resumed run
continues it.
"""

from __future__ import annotations

import dataclasses

import torch

from palaestra.agent.trajectory import Trajectory
from palaestra.config import PPOStage
from palaestra.rundir import RunDir
from palaestra.trainer.advantages import gae
from palaestra.trainer.batch import TokenBatch, collate, rows_of_token_values, token_values_of_rows
from palaestra.trainer.critic import Critic
from palaestra.trainer.learner import Learner, LossFn, OptimSettings
from palaestra.trainer.losses import value_loss
from palaestra.trainer.policy_gradient import (
    corrected_step,
    kl_in_reward_BT,
    loss_settings,
    policy_loss_fn,
    with_reference,
)
from palaestra.trainer.stages.common import StageResult, reference_policy
from palaestra.trainer.stages.onpolicy import Policy, run_on_policy


def run_ppo(cfg: PPOStage, run: RunDir) -> StageResult:
    """Run a PPO stage as configured, writing into ``run``."""
    return run_on_policy(cfg, run, lambda policy: PPOUpdate(cfg, policy), dynamic_sampling=cfg.grpo)


class PPOUpdate:
    """GAE advantages from a critic, a clipped policy step and a value step."""

    def __init__(self, cfg: PPOStage, policy: Policy) -> None:
        self.cfg, self.policy = cfg, policy
        self.reference = reference_policy(policy.model) if cfg.grpo.kl_coef > 0 else None
        self.loss = policy_loss_fn(loss_settings(cfg, cfg.grpo))
        critic = Critic.from_pretrained(cfg.ppo.critic_model or cfg.model, device=cfg.device)
        # the critic's AdamW keeps torch's defaults (betas, weight decay), without warm-up
        settings = OptimSettings(
            lr=cfg.ppo.critic_lr,
            betas=(0.9, 0.999),
            weight_decay=0.01,
            max_grad_norm=cfg.trainer.max_grad_norm,
            micro_batch_size=cfg.trainer.micro_batch_size,
        )
        self.critic = Learner(
            critic,
            settings,
            forward=lambda model, micro: model(micro),
            precision=cfg.precision(),
        )

    def __call__(self, trajectories: list[Trajectory]) -> dict[str, float]:
        trajectories = sorted(trajectories, key=lambda tr: -len(tr.token_ids))  # less padding
        batch = collate(trajectories, pad_id=self.policy.tokenizer.pad_token_id)
        batch = with_reference(self.policy.learner, self.reference, batch)
        # 1. values now
        batch = dataclasses.replace(batch, old_values_BT=self.critic.score(batch))
        # 2-3. per-token rewards, GAE
        batch, metrics = self._advantages(batch, trajectories)
        # 4. policy step (not while the critic warms up)
        if self.critic.steps >= self.cfg.ppo.critic_warmup_steps:
            metrics |= corrected_step(self.cfg.grpo, self.policy.learner, batch, self.loss)
        else:
            metrics["critic/warmup"] = 1.0
        # 5. critic step
        critic = self.critic.step(batch, self._value_loss(), weigh_metrics_by="tokens")
        return metrics | {f"critic/{k}": v for k, v in critic.items() if k != "lr"}

    def finish(self, run: RunDir) -> None:
        """Save the critic as ``checkpoints/critic-final``."""
        self.critic.model.save(run.checkpoints / "critic-final")  # type: ignore[operator]

    def learners(self) -> dict[str, Learner]:
        """The critic's: a training state keeps its weights and optimizer state."""
        return {"critic": self.critic}

    def _advantages(
        self, batch: TokenBatch, trajectories: list[Trajectory]
    ) -> tuple[TokenBatch, dict[str, float]]:
        """GAE advantages and returns per sampled token, from the rewards and old values."""
        ppo, g = self.cfg.ppo, self.cfg.grpo
        rewards = [_turn_end_rewards(tr) for tr in trajectories]
        metrics: dict[str, float] = {}
        if self.reference is not None and g.kl_placement == "reward":
            penalty_BT, metrics = kl_in_reward_BT(batch, g)
            penalty = token_values_of_rows(trajectories, penalty_BT)
            rewards = [
                [r + p for r, p in zip(rs, ps, strict=True)]
                for rs, ps in zip(rewards, penalty, strict=True)
            ]
        assert batch.old_values_BT is not None
        values = token_values_of_rows(trajectories, batch.old_values_BT)
        advantages, returns = [], []
        for tr, r, v in zip(trajectories, rewards, values, strict=True):
            a_1T, g_1T = gae(
                torch.tensor([r]),
                torch.tensor([v]),
                torch.tensor([tr.loss_mask]),
                gamma=ppo.gamma,
                lam=ppo.lam,
            )
            advantages.append(a_1T[0].tolist())
            returns.append(g_1T[0].tolist())
        advantages_BT = rows_of_token_values(trajectories, advantages)
        sampled = batch.loss_mask_BT.bool()
        if ppo.whiten_advantages and sampled.sum() > 1:
            a = advantages_BT[sampled]
            advantages_BT = torch.where(sampled, (advantages_BT - a.mean()) / (a.std() + 1e-8), 0.0)
        returns_BT = rows_of_token_values(trajectories, returns)
        metrics |= {
            "advantages/mean": float(advantages_BT[sampled].mean()),
            "advantages/std": float(advantages_BT[sampled].std()) if sampled.sum() > 1 else 0.0,
            "returns/mean": float(returns_BT[sampled].mean()),
            "values/mean": float(batch.old_values_BT[sampled].mean()),
        }
        batch = dataclasses.replace(batch, advantages_BT=advantages_BT, returns_BT=returns_BT)
        return batch, metrics

    def _value_loss(self) -> LossFn:
        clip = self.cfg.ppo.value_clip

        def loss(batch: TokenBatch, values_BT: torch.Tensor, *, num_tokens: float, num_seqs: float):
            assert batch.old_values_BT is not None and batch.returns_BT is not None
            return value_loss(
                values_BT,
                batch.old_values_BT,
                batch.returns_BT,
                batch.loss_mask_BT,
                clip=clip,
                num_tokens=num_tokens,
            )

        return loss


def _turn_end_rewards(trajectory: Trajectory) -> list[float]:
    """Each turn's env reward on its last sampled token; 0 elsewhere."""
    out = [0.0] * len(trajectory.token_ids)
    for turn in trajectory.turns:
        if turn.end > turn.start:
            out[turn.end - 1] += turn.reward
    return out
