"""The pieces every policy-gradient update shares (GRPO family and PPO alike): the loss
settings from the ``grpo`` section, the loss function the learner calls, the KL to the
reference placed in the reward, and the correction for the engine that sampled.

Stage modules (``stages/grpo.py``, ``stages/ppo.py``) build their updates from these; no
stage imports another. The math lives in ``trainer.losses`` and ``trainer.advantages``;
this module only wires batches to it.
"""

from __future__ import annotations

import dataclasses

import torch

from palaestra.config import GRPOConfig, OnPolicyStageConfig
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.learner import Learner, LossFn
from palaestra.trainer.losses import (
    PolicyLossInputs,
    PolicyLossSettings,
    behaviour_weights,
    kl_estimate,
    policy_loss,
)


def loss_settings(cfg: OnPolicyStageConfig, g: GRPOConfig) -> PolicyLossSettings:
    """The policy loss as the ``grpo`` section configures it; Dr.GRPO's constant length is
    the most a trajectory can sample (``max_tokens * max_turns``)."""
    in_loss = g.kl_coef > 0 and g.kl_placement == "loss"
    return PolicyLossSettings(
        clip_low=g.clip_low,
        clip_high=g.clip_high,
        aggregation=g.aggregation,
        ratio_level=g.ratio_level,
        kl_coef=g.kl_coef if in_loss else 0.0,
        kl_estimator=g.kl_estimator,
        max_seq_len=cfg.rollout.max_tokens * cfg.rollout.max_turns,
    )


def policy_loss_fn(settings: PolicyLossSettings) -> LossFn:
    """The learner's loss function: the clipped surrogate over a micro-batch's sampled
    tokens with their advantages, normalised by the whole step's counts."""

    def loss(batch: TokenBatch, logprobs_BT: torch.Tensor, *, num_tokens: float, num_seqs: float):
        if batch.old_logprobs_BT is None or batch.advantages_BT is None:
            raise ValueError("a policy batch needs old_logprobs_BT and advantages_BT")
        inputs = PolicyLossInputs(
            old_logprobs_BT=batch.old_logprobs_BT,
            advantages_BT=batch.advantages_BT,
            mask_BT=batch.loss_mask_BT,
            ref_logprobs_BT=batch.ref_logprobs_BT if settings.kl_coef > 0 else None,
            is_weights_BT=batch.is_weights_BT,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
        )
        return policy_loss(logprobs_BT, inputs, settings)

    return loss


def kl_in_reward_BT(batch: TokenBatch, g: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``-kl_coef * KL(behaviour || reference)`` on every sampled token of ``batch`` (which
    carries the reference's log-probs), and the mean KL per episode. GRPO sums it per
    episode into the reward; PPO adds it to each token's reward (classic RLHF)."""
    if batch.ref_logprobs_BT is None or batch.old_logprobs_BT is None:
        raise ValueError("the KL in the reward needs the reference's and the sampler's logprobs")
    kl_BT = kl_estimate(batch.old_logprobs_BT, batch.ref_logprobs_BT, g.kl_estimator)
    kl_BT = torch.where(batch.loss_mask_BT.bool(), kl_BT, 0.0)
    episodes = 1 if batch.episode_B is None else int(batch.episode_B.max()) + 1
    return -g.kl_coef * kl_BT, {"kl_per_seq": float(kl_BT.sum()) / episodes}


def corrected_step(
    g: GRPOConfig, learner: Learner, batch: TokenBatch, loss: LossFn
) -> dict[str, float]:
    """One policy step on ``batch`` (its ``old_logprobs_BT`` are the engine's) with the
    behaviour correction of ``behaviour_correction``, in one forward per micro-batch.

    The proximal policy is the learner's weights before this step, and this step is the
    only one taken on them: its own forward, detached, gives the proximal log-probs that a
    scoring pass would (the ratio is 1 in value and carries the gradient), so the scoring
    pass is skipped. A model with active dropout samples a different network each forward,
    so it is scored separately first, as ``behaviour_correction`` does. The mismatch
    metrics are computed over the whole batch after the step, as before.
    """
    level = g.importance_sampling
    if level == "off":
        return learner.step(batch, loss)
    if batch.old_logprobs_BT is None:
        raise ValueError("the behaviour correction needs the sampler's logprobs")
    if dropout_active(learner.model):
        corrected, mismatch = behaviour_correction(g, learner, batch)
        return learner.step(corrected, loss) | mismatch
    proximal_parts: list[torch.Tensor] = []

    def own_proximal(micro: TokenBatch, logprobs_BT: torch.Tensor, **counts: float):
        proximal_BT = logprobs_BT.detach().float()
        assert micro.old_logprobs_BT is not None  # the batch's, checked above
        weights_BT, _ = behaviour_weights(
            proximal_BT,
            micro.old_logprobs_BT,
            micro.loss_mask_BT,
            cap=g.is_cap,
            level=level,
        )
        width = batch.input_ids_BT.shape[1]
        proximal_parts.append(
            torch.nn.functional.pad(proximal_BT.cpu(), (0, width - proximal_BT.shape[1]))
        )
        micro = dataclasses.replace(micro, old_logprobs_BT=proximal_BT, is_weights_BT=weights_BT)
        return loss(micro, logprobs_BT, **counts)

    metrics = learner.step(batch, own_proximal)
    _, mismatch = behaviour_weights(
        torch.cat(proximal_parts),
        batch.old_logprobs_BT,
        batch.loss_mask_BT,
        cap=g.is_cap,
        level=level,
    )
    return metrics | mismatch


def dropout_active(model: torch.nn.Module) -> bool:
    """Whether ``model`` drops anything in training mode: a dropout module with ``p > 0``
    or a positive ``*dropout*`` / ``*pdrop`` setting in its Hugging Face config (attention
    dropout is a config number, not a module)."""
    if any(
        isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0
        for module in model.modules()
    ):
        return True
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    settings = to_dict() if callable(to_dict) else {}
    return any(
        ("dropout" in name or name.endswith("pdrop"))
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        for name, value in settings.items()
    )


def behaviour_correction(
    g: GRPOConfig, learner: Learner, batch: TokenBatch
) -> tuple[TokenBatch, dict[str, float]]:
    """With importance sampling on: clip against the learner's logprobs before this step
    (the proximal policy) and weigh tokens by the truncated ratio learner / engine."""
    if g.importance_sampling == "off":
        return batch, {}
    if batch.old_logprobs_BT is None:
        raise ValueError("the behaviour correction needs the sampler's logprobs")
    proximal_BT = learner.score(batch)
    weights_BT, metrics = behaviour_weights(
        proximal_BT,
        batch.old_logprobs_BT,
        batch.loss_mask_BT,
        cap=g.is_cap,
        level=g.importance_sampling,
    )
    return dataclasses.replace(
        batch, old_logprobs_BT=proximal_BT, is_weights_BT=weights_BT
    ), metrics


def with_reference(
    learner: Learner, reference: torch.nn.Module | None, batch: TokenBatch
) -> TokenBatch:
    """``batch`` with the reference model's log-probs of its tokens (when there is one)."""
    if reference is None:
        return batch
    return batch.with_ref_logprobs(learner.score(batch, model=reference))
