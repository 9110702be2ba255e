"""Policy-gradient losses and KL terms for token-level RL on language models.

Every function here is pure and synchronous: tensors in, ``(loss, metrics)`` out, no model,
no optimizer, no state. Shapes follow the token-sample contract of the ``TokenBatch``:

- ``B`` sequences, ``T`` positions (right-padded); ``mask_BT`` is 1 on tokens the policy
  sampled and is trained on, 0 on prompt, tool, env and padding positions. Values at
  masked positions never reach the loss or its gradient, whatever they are.
- ``logprobs_BT`` are the current policy's log-probabilities of the sampled tokens (with
  grad), ``old_logprobs_BT`` the behaviour policy's (no grad), ``ref_logprobs_BT`` the
  frozen reference model's (no grad).

GRPO, DAPO and Dr.GRPO are one function, ``policy_loss``, with different arguments:

=========  =================================  ====================================
recipe     advantages                         policy_loss arguments
=========  =================================  ====================================
GRPO       ``grouped_advantages``             ``aggregation="seq-mean-token-mean"``
DAPO       ``grouped_advantages``             ``clip_high=0.28``, ``"token-mean"``
Dr.GRPO    ``scale_by_std=False``             ``"seq-mean-token-sum-norm"``, ``max_seq_len``
=========  =================================  ====================================

The KL to the reference model goes either into the reward (``kl_penalized_rewards``, the
default placement: the k1 estimate there gives an unbiased penalty on the sequence) or
into the loss (``policy_loss(ref_logprobs_BT=..., kl_coef=...)``, GRPO paper's placement,
usually with k3). PPO's critic trains on ``value_loss``; SFT, the DPO family (DPO, cDPO,
IPO, SimPO, ORPO), KTO and the Bradley-Terry reward model have a function each at the end.
This module does not compute log-probabilities or advantages (``advantages.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LOSSES",
    "PREFERENCE_LOSSES",
    "bradley_terry_loss",
    "kl_estimate",
    "kl_penalized_rewards",
    "kto_loss",
    "policy_loss",
    "preference_loss",
    "sft_loss",
    "value_loss",
]

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
RatioLevel = Literal["token", "sequence"]
RATIO_LEVELS: tuple[str, ...] = get_args(RatioLevel)


def kl_estimate(
    logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Per-token sample estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
    With ``log_ratio = log pi(x) - log pi_ref(x)`` (policy over reference, so positive where
    the policy puts more mass than the reference):

    - ``k1 = log_ratio``: unbiased, can be negative, high variance.
    - ``k2 = 0.5 * log_ratio**2``: biased, never negative, low variance.
    - ``k3 = exp(-log_ratio) + log_ratio - 1``: unbiased, never negative, low variance
      (TRL's and the GRPO paper's per-token KL).

    All three are 0 where ``pi(x) == pi_ref(x)``. Gradients flow through ``logprobs_BT``.

    Args:
        logprobs_BT: policy log-probs of the sampled tokens, shape ``(B, T)`` (any shape).
        ref_logprobs_BT: reference log-probs of the same tokens, same shape.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        The per-token estimate, shape of ``logprobs_BT``, unmasked.
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_shape("ref_logprobs_BT", ref_logprobs_BT, logprobs_BT.shape)
    log_ratio_BT = logprobs_BT - ref_logprobs_BT
    if estimator == "k1":
        return log_ratio_BT
    if estimator == "k2":
        return 0.5 * log_ratio_BT**2
    return torch.exp(-log_ratio_BT) + log_ratio_BT - 1


def kl_penalized_rewards(
    rewards_B: torch.Tensor,
    logprobs_BT: torch.Tensor,
    ref_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards with the KL to the reference model subtracted (KL in the reward).

    ``r'_i = r_i - beta * sum_t mask_it * kl_t`` with ``kl_t = kl_estimate(..., estimator)``
    (Ziegler et al. 2019; InstructGPT). The sum over the sequence's sampled tokens estimates
    the sequence-level ``KL(pi || pi_ref)``, so k1 (the default) makes the penalty unbiased.
    Computed without grad: the penalty shapes the advantage, it is not differentiated.

    Args:
        rewards_B: one scalar reward per sequence, shape ``(B,)``.
        logprobs_BT: log-probs of the sampled tokens under the policy that sampled them.
        ref_logprobs_BT: log-probs of the same tokens under the reference model.
        mask_BT: 1 on sampled tokens, 0 elsewhere (bool or numeric).
        beta: KL coefficient, ``>= 0``.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see ``kl_estimate``).

    Returns:
        ``(penalized_rewards_B, {"kl_per_seq": mean over sequences of sum_t mask * kl_t})``.
    """
    _check_token_tensors(logprobs_BT, mask_BT=mask_BT, ref_logprobs_BT=ref_logprobs_BT)
    _check_shape("rewards_B", rewards_B, logprobs_BT.shape[:1])
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    with torch.no_grad():
        keep_BT = mask_BT.bool()
        kl_BT = kl_estimate(logprobs_BT, ref_logprobs_BT, estimator)
        kl_B = torch.where(keep_BT, kl_BT, 0.0).sum(dim=-1)
        penalized_B = rewards_B - beta * kl_B
    return penalized_B, {"kl_per_seq": kl_B.mean().item()}


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token-mean",
    ref_logprobs_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_seq_len: int | None = None,
    is_weights_BT: torch.Tensor | None = None,
    token_advantages_BT: torch.Tensor | None = None,
    ratio_level: RatioLevel = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped surrogate: the GRPO / DAPO / Dr.GRPO / GSPO policy loss.

    PPO-clip (Schulman et al. 2017, arXiv:1707.06347) applied per token as in GRPO (Shao et
    al. 2024, arXiv:2402.03300), with DAPO's asymmetric "clip-higher" range (Yu et al. 2025,
    arXiv:2503.14476)::

        ratio_it = exp(logprobs_it - old_logprobs_it)
        l_it     = -min(ratio_it * A_i, clip(ratio_it, 1 - clip_low, 1 + clip_high) * A_i)
                   [+ kl_coef * kl_it   when ref_logprobs_BT is given and kl_coef > 0]

    A token is clipped (no surrogate gradient) when ``A > 0`` and ratio > 1 + clip_high
    ("clip_frac_high") or ``A < 0`` and ratio < 1 - clip_low ("clip_frac_low"); on the other
    side of each bound the unclipped term is the minimum and the gradient flows.

    Aggregation over the ``mask_BT == 1`` tokens (``n_i`` = tokens of sequence i):

    - ``"token-mean"`` (DAPO; TRL "dapo"/"bnpo"): ``sum_it l_it / num_tokens``.
    - ``"seq-mean-token-mean"`` (GRPO; TRL "grpo"): ``sum_i (sum_t l_it / n_i) / num_seqs``.
    - ``"seq-mean-token-sum-norm"`` (Dr.GRPO; TRL "dr_grpo"):
      ``sum_i (sum_t l_it / max_seq_len) / num_seqs``.

    Micro-batching: ``num_tokens`` and ``num_seqs`` default to this batch's counts (mask sum,
    ``B``). When one optimizer step's batch is split into micro-batches, pass the counts of
    the WHOLE step: every term is then a sum over this micro-batch divided by a global
    constant, so summing the micro-batch losses (backward on each, no further scaling) gives
    exactly the full-batch loss and gradient. Sequences are never split, so ``n_i`` is local.

    Args:
        logprobs_BT: current policy log-probs of the sampled tokens, shape ``(B, T)``, grad.
        old_logprobs_BT: behaviour-policy log-probs, ``(B, T)``.
        advantages_B: one advantage per sequence, ``(B,)``.
        mask_BT: 1 on trained tokens, 0 elsewhere, ``(B, T)``, bool or numeric.
        clip_low, clip_high: clip range ``[1 - clip_low, 1 + clip_high]``; DAPO uses 0.2/0.28.
        aggregation: one of ``AGGREGATIONS``.
        ref_logprobs_BT: reference log-probs ``(B, T)``; with ``kl_coef > 0`` adds KL in the loss.
        kl_coef: coefficient of the per-token KL term; 0 means no KL in the loss.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` for the KL term (see ``kl_estimate``).
        num_tokens: token count the ``"token-mean"`` loss divides by (global step count).
        num_seqs: sequence count the ``"seq-mean-*"`` losses divide by (global step count).
        max_seq_len: the constant length of Dr.GRPO; required for ``"seq-mean-token-sum-norm"``.
        is_weights_BT: per-token importance weights (no grad) multiplying the surrogate, from
            ``behaviour_weights``: with them, ``old_logprobs_BT`` is the proximal policy (the
            learner's weights before this step) and the weights correct for the engine that
            sampled the tokens (decoupled PPO). ``None`` weighs every token 1.
        ratio_level: ``"token"`` (GRPO, DAPO) or ``"sequence"`` (GSPO, Zheng et al. 2025,
            arXiv:2507.18071): every token of sequence ``i`` takes the sequence's ratio
            ``exp(mean_t (logprobs_it - old_logprobs_it))``, clipped as a whole; pair it with
            ``"seq-mean-token-mean"`` for the paper's per-sequence objective.
        token_advantages_BT: an advantage per token ``(B, T)``, used instead of
            ``advantages_B`` (multi-turn episodes whose turns are credited separately,
            ``advantages.grouped_turn_advantages``); ``A_i`` above is then ``A_it``.

    Returns:
        ``(loss, metrics)``: the scalar loss, and python floats describing THIS batch on its
        own (normalised by its own counts, not by ``num_tokens`` / ``num_seqs``, so a learner
        averages them over micro-batches): ``loss``, ``policy_loss`` (the surrogate without
        the KL term), ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean`` (mean over tokens)
        and, with KL in the loss, ``kl`` (mean per-token estimate).
    """
    _check_token_tensors(logprobs_BT, mask_BT=mask_BT, old_logprobs_BT=old_logprobs_BT)
    _check_shape("advantages_B", advantages_B, logprobs_BT.shape[:1])
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_clip_range(clip_low, clip_high)
    _check_kl_args(ref_logprobs_BT, logprobs_BT, kl_coef)
    _check_positive(num_tokens=num_tokens, num_seqs=num_seqs, max_seq_len=max_seq_len)

    keep_BT = mask_BT.bool()
    maskf_BT = keep_BT.to(logprobs_BT.dtype)
    # Masked positions get log-ratio 0 (ratio 1, zero grad) whatever they hold: no inf * 0.
    log_ratio_BT = torch.where(keep_BT, logprobs_BT - old_logprobs_BT, 0.0)
    if ratio_level == "sequence":  # the mean over the sequence's tokens, for all of them
        tokens_B1 = maskf_BT.sum(-1, keepdim=True).clamp(min=1)
        log_ratio_BT = (log_ratio_BT.sum(-1, keepdim=True) / tokens_B1).expand_as(log_ratio_BT)
    ratio_BT = torch.exp(log_ratio_BT)
    if token_advantages_BT is not None:
        _check_shape("token_advantages_BT", token_advantages_BT, logprobs_BT.shape)
        adv_BT = token_advantages_BT.to(logprobs_BT.dtype)
    else:
        adv_BT = advantages_B.to(logprobs_BT.dtype).unsqueeze(-1).expand_as(logprobs_BT)
    clipped_ratio_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high)
    surrogate_BT = -torch.minimum(ratio_BT * adv_BT, clipped_ratio_BT * adv_BT)
    if is_weights_BT is not None:
        _check_shape("is_weights_BT", is_weights_BT, logprobs_BT.shape)
        surrogate_BT = surrogate_BT * is_weights_BT.detach()
    loss_BT = surrogate_BT

    kl_BT = None
    if ref_logprobs_BT is not None and kl_coef > 0:
        kl_BT = kl_estimate(
            torch.where(keep_BT, logprobs_BT, 0.0),
            torch.where(keep_BT, ref_logprobs_BT, 0.0),
            kl_estimator,
        )
        loss_BT = loss_BT + kl_coef * kl_BT
    loss = _aggregate(loss_BT, maskf_BT, aggregation, num_tokens, num_seqs, max_seq_len)

    with torch.no_grad():
        local_tokens = maskf_BT.sum().clamp(min=1)
        clipped_low_BT = (ratio_BT < 1 - clip_low) & (adv_BT < 0) & keep_BT
        clipped_high_BT = (ratio_BT > 1 + clip_high) & (adv_BT > 0) & keep_BT
        metrics = {
            "loss": _aggregate(loss_BT, maskf_BT, aggregation, None, None, max_seq_len).item(),
            "policy_loss": _aggregate(
                surrogate_BT, maskf_BT, aggregation, None, None, max_seq_len
            ).item(),
            "clip_frac_low": float(clipped_low_BT.sum() / local_tokens),
            "clip_frac_high": float(clipped_high_BT.sum() / local_tokens),
            "ratio_mean": float((ratio_BT * maskf_BT).sum() / local_tokens),
        }
        if kl_BT is not None:
            metrics["kl"] = float((kl_BT * maskf_BT).sum() / local_tokens)
    return loss, metrics


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, float]]]] = {
    "grpo": policy_loss,
}
"""Losses by name, as configs spell them. GRPO, DAPO and Dr.GRPO all use ``"grpo"``."""


def _aggregate(
    loss_BT: torch.Tensor,
    maskf_BT: torch.Tensor,
    aggregation: str,
    num_tokens: float | None,
    num_seqs: float | None,
    max_seq_len: int | None,
) -> torch.Tensor:
    """Reduce masked per-token losses to a scalar; see ``policy_loss`` for the formulas.

    ``num_tokens`` / ``num_seqs`` of None mean this batch's own counts.
    """
    masked_BT = loss_BT * maskf_BT
    if aggregation == "token-mean":
        token_count = maskf_BT.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked_BT.sum() / token_count
    seq_count = loss_BT.shape[0] if num_seqs is None else num_seqs
    if aggregation == "seq-mean-token-mean":
        tokens_B = maskf_BT.sum(dim=-1).clamp(min=1)
        return (masked_BT.sum(dim=-1) / tokens_B).sum() / seq_count
    if max_seq_len is None:
        raise ValueError(
            "max_seq_len is required for aggregation='seq-mean-token-sum-norm' (Dr.GRPO divides "
            "each sequence's token sum by this constant, e.g. the max completion length)."
        )
    return (masked_BT.sum(dim=-1) / max_seq_len).sum() / seq_count


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def _check_shape(name: str, tensor: torch.Tensor, expected: torch.Size | tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}.")


def _check_token_tensors(logprobs_BT: torch.Tensor, **others_BT: torch.Tensor) -> None:
    if logprobs_BT.dim() != 2:
        raise ValueError(
            f"logprobs_BT must be 2-D (batch, tokens), got shape {tuple(logprobs_BT.shape)}."
        )
    for name, tensor in others_BT.items():
        _check_shape(name, tensor, logprobs_BT.shape)


def _check_clip_range(clip_low: float, clip_high: float) -> None:
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1) so that 1 - clip_low > 0, got {clip_low}.")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}.")


def _check_kl_args(
    ref_logprobs_BT: torch.Tensor | None, logprobs_BT: torch.Tensor, kl_coef: float
) -> None:
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}.")
    if ref_logprobs_BT is not None:
        _check_shape("ref_logprobs_BT", ref_logprobs_BT, logprobs_BT.shape)
    if kl_coef > 0 and ref_logprobs_BT is None:
        raise ValueError("kl_coef > 0 puts KL in the loss and needs ref_logprobs_BT; pass it.")


def _check_positive(**counts: float | None) -> None:
    for name, value in counts.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 (or None for this batch's count), got {value}.")


ISLevel = Literal["token", "sequence"]
IS_LEVELS: tuple[str, ...] = get_args(ISLevel)


def behaviour_weights(
    proximal_logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    cap: float = 2.0,
    level: ISLevel = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights from the sampling engine to the learner, and mismatch metrics.

    The engine that sampled a token (the behaviour policy ``mu``, possibly some versions old,
    possibly in another precision or kernel) is not the learner's policy before this step
    (the proximal policy ``pi_prox``). Truncated importance sampling (Ionides 2008; as used
    for RL on LLMs with asynchronous or mismatched inference) weighs each token by::

        token:     w_it = min(pi_prox(y_it) / mu(y_it), cap)
        sequence:  w_i  = min(prod_t pi_prox(y_it) / mu(y_it), cap)   (same for all t of i)

    computed without grad. Metrics over the ``mask_BT == 1`` tokens: ``mismatch/abs_dlogprob``
    (mean ``|log pi_prox - log mu|``), ``mismatch/ess`` (normalised effective sample size of
    the untruncated weights, ``(sum w)^2 / (n sum w^2)``, 1 when the two policies agree) and
    ``mismatch/capped_frac`` (share of weights the cap truncated).

    Args:
        proximal_logprobs_BT: the learner's log-probs before the step, ``(B, T)``.
        behaviour_logprobs_BT: the engine's log-probs of the same tokens, ``(B, T)``.
        mask_BT: 1 on sampled tokens.
        cap: truncation level ``C >= 1``.
        level: ``"token"`` or ``"sequence"``.
    """
    _check_token_tensors(
        proximal_logprobs_BT, mask_BT=mask_BT, behaviour_logprobs_BT=behaviour_logprobs_BT
    )
    _check_choice("level", level, IS_LEVELS)
    if cap < 1:
        raise ValueError(
            f"cap must be >= 1 (a weight cap below 1 down-weights agreement), got {cap}"
        )
    with torch.no_grad():
        keep_BT = mask_BT.bool()
        maskf_BT = keep_BT.to(proximal_logprobs_BT.dtype)
        delta_BT = torch.where(keep_BT, proximal_logprobs_BT - behaviour_logprobs_BT, 0.0)
        log_w_BT = delta_BT
        if level == "sequence":
            log_w_BT = delta_BT.sum(dim=1, keepdim=True).expand_as(delta_BT)
        raw_BT = torch.exp(log_w_BT)
        weights_BT = raw_BT.clamp(max=cap) * maskf_BT
        n = maskf_BT.sum().clamp(min=1)
        raw = raw_BT[keep_BT]
        ess = (raw.sum() ** 2 / (n * (raw**2).sum())).item() if raw.numel() else 1.0
        metrics = {
            "mismatch/abs_dlogprob": (delta_BT.abs().sum() / n).item(),
            "mismatch/ess": ess,
            "mismatch/capped_frac": ((raw_BT > cap) & keep_BT).sum().item() / n.item(),
        }
    return weights_BT, metrics


# --- value loss (PPO's critic) -------------------------------------------------------------


def value_loss(
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip: float | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's value loss over sampled tokens, optionally clipped (Schulman et al. 2017).

    ``L = sum_t mask_t * 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)
    / num_tokens``; without ``clip`` only the first term. Clipping keeps the critic within
    ``c`` of its values at sampling time, as the policy's ratio clip does for the policy.

    Args:
        values_BT: the critic's values now (with grad).
        old_values_BT: its values when the batch was sampled (no grad).
        returns_BT: the regression targets (GAE returns, ``advantages + old values``).
        mask_BT: 1 on sampled tokens, the only positions with values.
        clip: the clip range ``c``, or None for an unclipped squared error.
        num_tokens: the normaliser (the step's sampled tokens); default this call's count.

    Returns:
        ``(loss, {"value_loss", "value_clip_frac", "explained_variance"})``.
    """
    _check_token_tensors(
        values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, mask_BT=mask_BT
    )
    keep_BT = mask_BT.bool()
    error_BT = (values_BT - returns_BT) ** 2
    if clip is not None:
        clipped_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
        error_BT = torch.maximum(error_BT, (clipped_BT - returns_BT) ** 2)
    here = float(keep_BT.sum().clamp(min=1))
    total = 0.5 * torch.where(keep_BT, error_BT, 0.0).sum()
    loss = total / (here if num_tokens is None else num_tokens)
    with torch.no_grad():
        v, r = values_BT[keep_BT].float(), returns_BT[keep_BT].float()
        clipped = (values_BT - old_values_BT).abs() > clip if clip is not None else None
        metrics = {
            "value_loss": total.item() / here,
            "value_clip_frac": float(clipped[keep_BT].float().mean())
            if clipped is not None
            else 0.0,
            "explained_variance": float(1 - (r - v).var() / r.var())
            if r.numel() > 1 and r.var() > 0
            else 0.0,
        }
    return loss, metrics


# --- supervised and preference losses ------------------------------------------------------

PreferenceLossName = Literal["sigmoid", "ipo", "simpo", "orpo"]
PREFERENCE_LOSSES: tuple[str, ...] = get_args(PreferenceLossName)
REFERENCE_FREE: tuple[str, ...] = ("simpo", "orpo")


def sft_loss(
    logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, *, num_tokens: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning: the negative log-likelihood of the target tokens.

    ``L = -sum_t mask_t * log pi(x_t) / num_tokens``: a token mean over the step's target
    tokens (assistant tokens of a chat), so micro-batches add up to the whole batch's mean.

    Returns:
        ``(loss, {"loss": this call's mean NLL per target token})``.
    """
    _check_token_tensors(logprobs_BT, mask_BT=mask_BT)
    keep_BT = mask_BT.bool()
    nll = -torch.where(keep_BT, logprobs_BT, 0.0).sum()
    count = float(keep_BT.sum().clamp(min=1))
    loss = nll / (count if num_tokens is None else num_tokens)
    return loss, {"loss": nll.item() / count}


def preference_loss(
    chosen_logps_P: torch.Tensor,
    rejected_logps_P: torch.Tensor,
    *,
    loss: PreferenceLossName,
    beta: float,
    ref_chosen_logps_P: torch.Tensor | None = None,
    ref_rejected_logps_P: torch.Tensor | None = None,
    chosen_lengths_P: torch.Tensor | None = None,
    rejected_lengths_P: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    num_pairs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise preference losses on ``P`` (chosen, rejected) pairs.

    Inputs are each answer's SUMMED token log-probs (``c``, ``r``; ``c_ref``, ``r_ref`` under
    the frozen reference) and its token count (``l_c``, ``l_r``); ``s = sigmoid``:

    - ``sigmoid``, DPO (Rafailov et al. 2023), with cDPO's label smoothing ``e`` (the chance
      a label is flipped): ``d = (c - c_ref) - (r - r_ref)``,
      ``L = -(1 - e) log s(beta d) - e log s(-beta d)``.
    - ``ipo`` (Azar et al. 2023, Eq. 17), on per-token log-ratios as TRL does:
      ``d = (c - c_ref) / l_c - (r - r_ref) / l_r``, ``L = (d - 1 / (2 beta))^2``.
    - ``simpo`` (Meng et al. 2024), reference-free, length-normalised, target margin
      ``gamma``: ``L = -(1 - e) log s(beta d - gamma) - e log s(-(beta d - gamma))`` with
      ``d = c / l_c - r / l_r``.
    - ``orpo`` (Hong et al. 2024), reference-free: with the mean token log-probs
      ``m_c = c / l_c``, ``m_r = r / l_r`` and ``log odds(m) = m - log(1 - exp(m))``,
      ``L = -m_c - beta log s(log odds(m_c) - log odds(m_r))``: the chosen answer's NLL plus
      the odds-ratio term. TRL averages the NLL over all chosen tokens of the batch; here
      it is each pair's mean, so the two agree when the chosen answers are equally long.

    The loss is the sum over pairs divided by ``num_pairs`` (the step's pair count; default
    ``P``), so micro-batches add up to the whole batch's mean.

    Returns:
        ``(loss, metrics)``: this call's mean ``loss`` per pair, the implicit rewards ``rewards/chosen``, ``rewards/rejected``
        (``beta`` times the log-ratio to the reference; times the mean token log-prob for
        the reference-free losses), their ``rewards/margin`` and ``rewards/accuracy`` (the
        fraction of pairs ranked right), means over this call's pairs.
    """
    _check_choice("loss", loss, PREFERENCE_LOSSES)
    _check_shape("rejected_logps_P", rejected_logps_P, chosen_logps_P.shape)
    if beta <= 0 or not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"need beta > 0 and 0 <= label_smoothing < 0.5, got {beta}, {label_smoothing}"
        )
    c, r = chosen_logps_P.float(), rejected_logps_P.float()
    if loss in ("ipo", "simpo", "orpo"):
        if chosen_lengths_P is None or rejected_lengths_P is None:
            raise ValueError(f"loss {loss!r} averages over answer tokens: pass the lengths")
        l_c, l_r = chosen_lengths_P.float().clamp(min=1), rejected_lengths_P.float().clamp(min=1)
    if loss in REFERENCE_FREE:
        reward_c, reward_r = beta * c / l_c, beta * r / l_r
    else:
        if ref_chosen_logps_P is None or ref_rejected_logps_P is None:
            raise ValueError(f"loss {loss!r} needs the reference model's log-probs")
        log_ratio_c, log_ratio_r = c - ref_chosen_logps_P.float(), r - ref_rejected_logps_P.float()
        reward_c, reward_r = beta * log_ratio_c, beta * log_ratio_r
    if loss == "sigmoid":
        losses_P = _smoothed_logistic(beta * (log_ratio_c - log_ratio_r), label_smoothing)
    elif loss == "ipo":
        losses_P = (log_ratio_c / l_c - log_ratio_r / l_r - 1 / (2 * beta)) ** 2
    elif loss == "simpo":
        losses_P = _smoothed_logistic(beta * (c / l_c - r / l_r) - simpo_gamma, label_smoothing)
    else:  # orpo
        m_c, m_r = c / l_c, r / l_r
        log_odds_P = (m_c - _log1mexp(m_c)) - (m_r - _log1mexp(m_r))
        losses_P = -m_c - beta * torch.nn.functional.logsigmoid(log_odds_P)
    total = losses_P.sum() / (len(losses_P) if num_pairs is None else num_pairs)
    with torch.no_grad():
        margin_P = reward_c - reward_r
        metrics = {
            "loss": losses_P.mean().item(),
            "rewards/chosen": reward_c.mean().item(),
            "rewards/rejected": reward_r.mean().item(),
            "rewards/margin": margin_P.mean().item(),
            "rewards/accuracy": (margin_P > 0).float().mean().item(),
        }
    return total, metrics


def kto_loss(
    logps_N: torch.Tensor,
    ref_logps_N: torch.Tensor,
    desirable_N: torch.Tensor,
    *,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    num_examples: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO on unpaired answers labelled desirable or not (Ethayarajh et al. 2024, Eq. 7).

    With the log-ratio ``z = logp - logp_ref`` of each answer (summed over its tokens) and
    the reference point ``z0 = max(KL, 0)``, treated as a constant:
    ``L = w_D (1 - s(beta (z - z0)))`` for desirable answers and
    ``L = w_U (1 - s(beta (z0 - z)))`` for undesirable ones, summed and divided by
    ``num_examples`` (default ``N``). ``kl`` is the batch estimate of ``KL(pi || pi_ref)``
    that TRL uses: the mean log-ratio of answers paired with OTHER examples' prompts
    (mismatched pairs), computed by the caller.

    Returns:
        ``(loss, {"loss", "kl", "rewards/desirable", "rewards/undesirable"})``, with the
        mean loss per answer of this call and rewards ``beta z``.
    """
    _check_shape("ref_logps_N", ref_logps_N, logps_N.shape)
    _check_shape("desirable_N", desirable_N, logps_N.shape)
    z0 = torch.as_tensor(kl, dtype=torch.float32).detach().clamp(min=0)
    z_N = logps_N.float() - ref_logps_N.float()
    good_N = desirable_N.bool()
    losses_N = torch.where(
        good_N,
        desirable_weight * (1 - torch.sigmoid(beta * (z_N - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - z_N))),
    )
    total = losses_N.sum() / (len(losses_N) if num_examples is None else num_examples)
    with torch.no_grad():
        rewards_N = beta * z_N
        metrics = {
            "loss": losses_N.mean().item(),
            "kl": z0.item(),
            "rewards/desirable": rewards_N[good_N].mean().item() if good_N.any() else 0.0,
            "rewards/undesirable": rewards_N[~good_N].mean().item() if (~good_N).any() else 0.0,
        }
    return total, metrics


def bradley_terry_loss(
    chosen_rewards_P: torch.Tensor,
    rejected_rewards_P: torch.Tensor,
    *,
    margin_P: torch.Tensor | None = None,
    num_pairs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-model loss under the Bradley-Terry model (Ouyang et al. 2022, Eq. 1).

    ``P(chosen > rejected) = s(r_c - r_r)``; ``L = -log s(r_c - r_r - m)`` summed over pairs
    and divided by ``num_pairs`` (default ``P``); the optional margin ``m`` asks for a gap.

    Returns:
        ``(loss, {"loss", "accuracy", "margin"})``, means over this call's pairs.
    """
    _check_shape("rejected_rewards_P", rejected_rewards_P, chosen_rewards_P.shape)
    diff_P = chosen_rewards_P.float() - rejected_rewards_P.float()
    shifted_P = diff_P if margin_P is None else diff_P - margin_P.float()
    losses_P = -torch.nn.functional.logsigmoid(shifted_P)
    total = losses_P.sum() / (len(losses_P) if num_pairs is None else num_pairs)
    with torch.no_grad():
        metrics = {
            "loss": losses_P.mean().item(),
            "accuracy": (diff_P > 0).float().mean().item(),
            "margin": diff_P.mean().item(),
        }
    return total, metrics


def _smoothed_logistic(logits_P: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``-(1 - e) log s(x) - e log s(-x)``: the logistic loss with flip probability ``e``."""
    logsigmoid = torch.nn.functional.logsigmoid
    return -(1 - smoothing) * logsigmoid(logits_P) - smoothing * logsigmoid(-logits_P)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x``."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
