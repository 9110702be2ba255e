"""Preference pairs from interleaved answer rows: the step the DPO and online DPO stages share.

Both stages lay answers out chosen, rejected, chosen, rejected, ... and sum each answer's
token log-probs (the DPO stage over one row per answer, online DPO over every row of an
episode). ``pair_loss`` turns those sums into ``PairLogps`` and applies the ``dpo.loss``
preference loss (``trainer.losses.preference_loss``); ``needs_reference`` says whether a
``dpo.loss`` compares against a frozen reference model.

What this module does not do: compute log-probs (the learner), pick pairs (the stages) or
KTO, whose answers are unpaired (the DPO stage calls ``kto_loss`` itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from palaestra.trainer.losses import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceSettings,
    preference_loss,
)

if TYPE_CHECKING:
    from palaestra.config import DPOConfig
    from palaestra.options import DPOLoss


def needs_reference(loss: DPOLoss) -> bool:
    """Whether ``dpo.loss`` measures log-ratios to a frozen reference (KTO always does)."""
    return loss == "kto" or PREFERENCE_LOSSES[loss].needs_reference


def pair_loss(
    settings: DPOConfig,
    sums_B: torch.Tensor,
    lengths_B: torch.Tensor,
    ref_sums_B: torch.Tensor | None,
    num_pairs: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The ``settings.loss`` preference loss over answers laid out chosen, rejected, ...

    Args:
        settings: the ``dpo`` section (loss, beta, label smoothing, SimPO's gamma).
        sums_B: each answer's summed token log-probs under the policy, with grad.
        lengths_B: each answer's trained-token count.
        ref_sums_B: the same sums under the reference, or None for a reference-free loss.
        num_pairs: the step's pair count, so micro-batches add up to the step's mean.

    Returns:
        ``preference_loss``'s ``(loss, metrics)``.
    """
    pairs = PairLogps(
        chosen_P=sums_B[0::2],
        rejected_P=sums_B[1::2],
        chosen_lengths_P=lengths_B[0::2],
        rejected_lengths_P=lengths_B[1::2],
        ref_chosen_P=None if ref_sums_B is None else ref_sums_B[0::2],
        ref_rejected_P=None if ref_sums_B is None else ref_sums_B[1::2],
        num_pairs=num_pairs,
    )
    loss_settings = PreferenceSettings(
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        simpo_gamma=settings.simpo_gamma,
    )
    return preference_loss(settings.loss, pairs, loss_settings)
