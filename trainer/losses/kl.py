"""The KL from the policy to the frozen reference model: per-token estimates, and rewards
with the KL subtracted.

Two placements share these estimates: in the reward (``kl_penalized_rewards``, the default;
the k1 estimate summed over a sequence is an unbiased penalty) or in the loss
(``PolicyLossSettings.kl_coef``, the GRPO paper's placement, usually with k3). This module
computes no log-probabilities and decides no placement; the stage does.
"""

from __future__ import annotations

import torch

from palaestra.options import KL_ESTIMATORS, KLEstimator
from palaestra.trainer.losses._checks import check_choice, check_shape, check_token_tensors


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
    check_choice("estimator", estimator, KL_ESTIMATORS)
    check_shape("ref_logprobs_BT", ref_logprobs_BT, logprobs_BT.shape)
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
    check_token_tensors(logprobs_BT, mask_BT=mask_BT, ref_logprobs_BT=ref_logprobs_BT)
    check_shape("rewards_B", rewards_B, logprobs_BT.shape[:1])
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}.")
    with torch.no_grad():
        keep_BT = mask_BT.bool()
        kl_BT = kl_estimate(logprobs_BT, ref_logprobs_BT, estimator)
        kl_B = torch.where(keep_BT, kl_BT, 0.0).sum(dim=-1)
        penalized_B = rewards_B - beta * kl_B
    return penalized_B, {"kl_per_seq": kl_B.mean().item()}
