"""The reward model's loss: Bradley-Terry on scored (chosen, rejected) pairs.

``bradley_terry_loss`` takes the scalar scores the reward model gave each answer; the
reward-model stage runs the model. The policy's pairwise losses are in ``preference``.
"""

from __future__ import annotations

import torch
from torch.nn.functional import logsigmoid

from palaestra.trainer.losses._checks import check_shape


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

    Args:
        chosen_rewards_P: the reward model's scores of the chosen answers, ``(P,)``, grad.
        rejected_rewards_P: its scores of the rejected answers, ``(P,)``.
        margin_P: the gap each pair asks for, ``(P,)``; None for no margin.
        num_pairs: the step's pair count (micro-batching); default ``P``.

    Returns:
        ``(loss, {"loss", "accuracy", "margin"})``, means over this call's pairs.
    """
    check_shape("rejected_rewards_P", rejected_rewards_P, chosen_rewards_P.shape)
    diff_P = chosen_rewards_P.float() - rejected_rewards_P.float()
    shifted_P = diff_P if margin_P is None else diff_P - margin_P.float()
    losses_P = -logsigmoid(shifted_P)
    total = losses_P.sum() / (len(losses_P) if num_pairs is None else num_pairs)
    with torch.no_grad():
        metrics = {
            "loss": losses_P.mean().item(),
            "accuracy": (diff_P > 0).float().mean().item(),
            "margin": diff_P.mean().item(),
        }
    return total, metrics
