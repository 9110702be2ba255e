"""KTO: preference optimisation from unpaired answers labelled desirable or not.

``kto_loss`` takes each answer's summed log-probs under the policy and the frozen reference
and a batch estimate of the KL; the DPO stage computes all three (the KL from answers
paired with other examples' prompts). The pairwise losses are in ``preference``.
"""

from __future__ import annotations

import torch

from palaestra.trainer.losses._checks import check_shape


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

    Args:
        logps_N: the ``N`` answers' summed log-probs under the policy (with grad).
        ref_logps_N: the same under the frozen reference, ``(N,)``.
        desirable_N: True for desirable answers, ``(N,)``.
        kl: the batch KL estimate (no grad is taken through it).
        beta: inverse temperature of the implicit reward ``beta z``.
        desirable_weight, undesirable_weight: ``w_D`` and ``w_U``.
        num_examples: the step's answer count (micro-batching); default ``N``.

    Returns:
        ``(loss, metrics)``; see ``_kto_metrics``.
    """
    check_shape("ref_logps_N", ref_logps_N, logps_N.shape)
    check_shape("desirable_N", desirable_N, logps_N.shape)
    z0 = torch.as_tensor(kl, dtype=torch.float32).detach().clamp(min=0)
    z_N = logps_N.float() - ref_logps_N.float()
    good_N = desirable_N.bool()
    losses_N = torch.where(
        good_N,
        desirable_weight * (1 - torch.sigmoid(beta * (z_N - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - z_N))),
    )
    total = losses_N.sum() / (len(losses_N) if num_examples is None else num_examples)
    return total, _kto_metrics(losses_N, z_N, good_N, z0, beta)


def _kto_metrics(
    losses_N: torch.Tensor, z_N: torch.Tensor, good_N: torch.Tensor, z0: torch.Tensor, beta: float
) -> dict[str, float]:
    """This call's mean ``loss`` per answer, the reference point ``kl`` and the mean rewards
    ``beta z`` of its ``rewards/desirable`` and ``rewards/undesirable`` answers (0 if none)."""
    with torch.no_grad():
        rewards_N = beta * z_N
        return {
            "loss": losses_N.mean().item(),
            "kl": z0.item(),
            "rewards/desirable": rewards_N[good_N].mean().item() if good_N.any() else 0.0,
            "rewards/undesirable": rewards_N[~good_N].mean().item() if (~good_N).any() else 0.0,
        }
