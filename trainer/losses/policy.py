"""The clipped policy loss of the GRPO family (GRPO, DAPO, Dr.GRPO, GSPO) and PPO's actor.

One function, ``policy_loss(logprobs_BT, inputs, settings)``, over two records: the batch's
tensors besides the log-probs being trained (``PolicyLossInputs``) and the recipe
(``PolicyLossSettings``: clip range, aggregation, ratio level, KL in the loss). Its metrics
come from ``_policy_metrics`` beside it. Shapes follow the ``TokenBatch``: ``B`` sequences
of ``T`` right-padded positions, and ``mask_BT`` is 1 on the tokens the policy sampled and
is trained on; values at masked positions never reach the loss or its gradient.

This module does not compute log-probabilities, advantages (``trainer.advantages``; a
per-sequence advantage is spread over the tokens by the caller), the KL in the reward
(``kl.kl_penalized_rewards``) or the behaviour weights (``importance.behaviour_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palaestra.options import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    Aggregation,
    KLEstimator,
    RatioLevel,
)
from palaestra.trainer.losses._checks import check_choice, check_step_counts, check_token_tensors
from palaestra.trainer.losses.kl import kl_estimate


@dataclass(frozen=True)
class PolicyLossSettings:
    """The recipe of ``policy_loss``: what differs between GRPO, DAPO, Dr.GRPO and GSPO."""

    clip_low: float = 0.2
    """Ratios below ``1 - clip_low`` stop pushing a negative-advantage token down; in [0, 1)."""
    clip_high: float = 0.2
    """Ratios above ``1 + clip_high`` stop pushing a positive-advantage token up; DAPO: 0.28."""
    aggregation: Aggregation = "token-mean"
    """How per-token losses become one number (see ``policy_loss``)."""
    ratio_level: RatioLevel = "token"
    """``"token"`` (GRPO, DAPO) or ``"sequence"`` (GSPO: one ratio per sequence)."""
    kl_coef: float = 0.0
    """Coefficient of the per-token KL to the reference in the loss; 0 keeps KL out of it.
    Above 0 the inputs must carry ``ref_logprobs_BT``."""
    kl_estimator: KLEstimator = "k3"
    """Estimator of the KL term (see ``kl.kl_estimate``)."""
    max_seq_len: int | None = None
    """Dr.GRPO's constant divisor of each sequence's token sum (e.g. the max completion
    length); required for ``"seq-mean-token-sum-norm"``, unused otherwise."""

    def __post_init__(self) -> None:
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if not 0 <= self.clip_low < 1:
            raise ValueError(
                f"clip_low must be in [0, 1) so that 1 - clip_low > 0, got {self.clip_low}."
            )
        if self.clip_high < 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}.")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")
        if self.max_seq_len is not None and not self.max_seq_len > 0:
            raise ValueError(f"max_seq_len must be > 0, got {self.max_seq_len}.")
        if self.aggregation == "seq-mean-token-sum-norm" and self.max_seq_len is None:
            raise ValueError(
                "max_seq_len is required for aggregation='seq-mean-token-sum-norm' (Dr.GRPO "
                "divides each sequence's token sum by this constant, e.g. the max completion "
                "length)."
            )


@dataclass(frozen=True)
class PolicyLossInputs:
    """One (micro-)batch's tensors for ``policy_loss``, all ``(B, T)`` like its log-probs."""

    old_logprobs_BT: torch.Tensor
    """Log-probs of the sampled tokens under the behaviour policy, or under the proximal
    policy (the learner before this step) when ``is_weights_BT`` is given; no grad."""
    advantages_BT: torch.Tensor
    """One advantage per token; a per-sequence advantage is broadcast over its tokens by the
    caller. Only positions with ``mask_BT == 1`` matter."""
    mask_BT: torch.Tensor
    """1 on trained tokens, 0 on prompt, tool, env and padding positions; bool or numeric."""
    ref_logprobs_BT: torch.Tensor | None = None
    """The frozen reference model's log-probs; needed when ``kl_coef > 0``."""
    is_weights_BT: torch.Tensor | None = None
    """Per-token importance weights (``behaviour_weights``) multiplying the surrogate, for
    the engine that sampled; None weighs every token 1."""
    num_tokens: float | None = None
    """The WHOLE optimizer step's token count (micro-batching); None: this batch's own."""
    num_seqs: float | None = None
    """The WHOLE optimizer step's sequence count (micro-batching); None: this batch's ``B``."""

    def __post_init__(self) -> None:
        check_step_counts(num_tokens=self.num_tokens, num_seqs=self.num_seqs)


def policy_loss(
    logprobs_BT: torch.Tensor, inputs: PolicyLossInputs, settings: PolicyLossSettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped surrogate: the GRPO / DAPO / Dr.GRPO / GSPO policy loss.

    PPO-clip (Schulman et al. 2017, arXiv:1707.06347) applied per token as in GRPO (Shao et
    al. 2024, arXiv:2402.03300), with DAPO's asymmetric "clip-higher" range (Yu et al. 2025,
    arXiv:2503.14476)::

        ratio_it = exp(logprobs_it - old_logprobs_it)
        l_it     = -w_it * min(ratio_it * A_it, clip(ratio_it, 1 - clip_low, 1 + clip_high) * A_it)
                   [+ kl_coef * kl_it   when kl_coef > 0]

    with ``w_it`` the importance weights (1 without). A token is clipped (no surrogate
    gradient) when ``A > 0`` and ratio > 1 + clip_high ("clip_frac_high") or ``A < 0`` and
    ratio < 1 - clip_low ("clip_frac_low"); on the other side of each bound the unclipped
    term is the minimum and the gradient flows. With ``ratio_level="sequence"`` (GSPO, Zheng
    et al. 2025, arXiv:2507.18071) every token of sequence ``i`` takes the sequence's ratio
    ``exp(mean_t (logprobs_it - old_logprobs_it))``, clipped as a whole; pair it with
    ``"seq-mean-token-mean"`` for the paper's per-sequence objective.

    The per-token losses over ``mask_BT == 1`` reduce by ``settings.aggregation`` (the
    formulas are in ``_aggregate``).

    Micro-batching: with the WHOLE step's ``num_tokens`` / ``num_seqs`` in ``inputs`` every
    term is a sum over this micro-batch divided by a global constant, so summing the
    micro-batch losses (backward on each, no further scaling) gives exactly the full-batch
    loss and gradient. Sequences are never split, so ``n_i`` is local.

    ``logprobs_BT`` are the current policy's log-probs of the sampled tokens, ``(B, T)``,
    with grad; ``inputs`` holds the batch's other ``(B, T)`` tensors and the step's counts,
    ``settings`` the recipe. Returns ``(loss, metrics)``, the latter from ``_policy_metrics``.
    """
    _check_inputs(logprobs_BT, inputs, settings)
    keep_BT = inputs.mask_BT.bool()
    maskf_BT = keep_BT.to(logprobs_BT.dtype)
    # Masked positions get log-ratio 0 (ratio 1, zero grad) whatever they hold: no inf * 0.
    log_ratio_BT = torch.where(keep_BT, logprobs_BT - inputs.old_logprobs_BT, 0.0)
    if settings.ratio_level == "sequence":  # the mean over the sequence's tokens, for all
        tokens_B1 = maskf_BT.sum(-1, keepdim=True).clamp(min=1)
        log_ratio_BT = (log_ratio_BT.sum(-1, keepdim=True) / tokens_B1).expand_as(log_ratio_BT)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = torch.where(keep_BT, inputs.advantages_BT.to(logprobs_BT.dtype), 0.0)
    clipped_ratio_BT = ratio_BT.clamp(1 - settings.clip_low, 1 + settings.clip_high)
    surrogate_BT = -torch.minimum(ratio_BT * adv_BT, clipped_ratio_BT * adv_BT)
    if inputs.is_weights_BT is not None:
        surrogate_BT = surrogate_BT * inputs.is_weights_BT.detach()
    loss_BT, kl_BT = surrogate_BT, None
    if inputs.ref_logprobs_BT is not None and settings.kl_coef > 0:
        kl_BT = kl_estimate(
            torch.where(keep_BT, logprobs_BT, 0.0),
            torch.where(keep_BT, inputs.ref_logprobs_BT, 0.0),
            settings.kl_estimator,
        )
        loss_BT = surrogate_BT + settings.kl_coef * kl_BT
    loss = _aggregate(loss_BT, maskf_BT, settings, inputs.num_tokens, inputs.num_seqs)
    metrics = _policy_metrics(loss_BT, surrogate_BT, kl_BT, ratio_BT, adv_BT, maskf_BT, settings)
    return loss, metrics


def _policy_metrics(
    loss_BT: torch.Tensor,
    surrogate_BT: torch.Tensor,
    kl_BT: torch.Tensor | None,
    ratio_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    maskf_BT: torch.Tensor,
    settings: PolicyLossSettings,
) -> dict[str, float]:
    """Python floats describing THIS batch on its own, normalised by its own counts (not by
    the step's, so a learner averages them over micro-batches): ``loss``, ``policy_loss``
    (the surrogate without the KL term), ``clip_frac_low``, ``clip_frac_high``,
    ``ratio_mean`` (mean over tokens) and, with KL in the loss, ``kl`` (mean per token)."""
    with torch.no_grad():
        keep_BT = maskf_BT.bool()
        local_tokens = maskf_BT.sum().clamp(min=1)
        clipped_low_BT = (ratio_BT < 1 - settings.clip_low) & (adv_BT < 0) & keep_BT
        clipped_high_BT = (ratio_BT > 1 + settings.clip_high) & (adv_BT > 0) & keep_BT
        metrics = {
            "loss": _aggregate(loss_BT, maskf_BT, settings).item(),
            "policy_loss": _aggregate(surrogate_BT, maskf_BT, settings).item(),
            "clip_frac_low": float(clipped_low_BT.sum() / local_tokens),
            "clip_frac_high": float(clipped_high_BT.sum() / local_tokens),
            "ratio_mean": float((ratio_BT * maskf_BT).sum() / local_tokens),
        }
        if kl_BT is not None:
            metrics["kl"] = float((kl_BT * maskf_BT).sum() / local_tokens)
    return metrics


def _aggregate(
    loss_BT: torch.Tensor,
    maskf_BT: torch.Tensor,
    settings: PolicyLossSettings,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> torch.Tensor:
    """Reduce masked per-token losses to a scalar (``n_i`` = tokens of sequence i):

    - ``"token-mean"`` (DAPO; TRL "dapo"/"bnpo"): ``sum_it l_it / num_tokens``.
    - ``"seq-mean-token-mean"`` (GRPO; TRL "grpo"): ``sum_i (sum_t l_it / n_i) / num_seqs``.
    - ``"seq-mean-token-sum-norm"`` (Dr.GRPO; TRL "dr_grpo"):
      ``sum_i (sum_t l_it / max_seq_len) / num_seqs``.

    ``num_tokens`` / ``num_seqs`` of None mean this batch's own counts.
    """
    masked_BT = loss_BT * maskf_BT
    if settings.aggregation == "token-mean":
        token_count = maskf_BT.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked_BT.sum() / token_count
    seq_count = loss_BT.shape[0] if num_seqs is None else num_seqs
    if settings.aggregation == "seq-mean-token-mean":
        tokens_B = maskf_BT.sum(dim=-1).clamp(min=1)
        return (masked_BT.sum(dim=-1) / tokens_B).sum() / seq_count
    assert settings.max_seq_len is not None  # PolicyLossSettings requires it for this mode
    return (masked_BT.sum(dim=-1) / settings.max_seq_len).sum() / seq_count


def _check_inputs(
    logprobs_BT: torch.Tensor, inputs: PolicyLossInputs, settings: PolicyLossSettings
) -> None:
    """Every tensor ``(B, T)`` like ``logprobs_BT``; a reference when KL is in the loss."""
    check_token_tensors(
        logprobs_BT,
        mask_BT=inputs.mask_BT,
        old_logprobs_BT=inputs.old_logprobs_BT,
        advantages_BT=inputs.advantages_BT,
        ref_logprobs_BT=inputs.ref_logprobs_BT,
        is_weights_BT=inputs.is_weights_BT,
    )
    if settings.kl_coef > 0 and inputs.ref_logprobs_BT is None:
        raise ValueError("kl_coef > 0 puts KL in the loss and needs ref_logprobs_BT; pass it.")
