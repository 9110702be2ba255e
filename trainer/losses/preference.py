"""Pairwise preference losses, the DPO family: DPO (cDPO), IPO, SimPO and ORPO.

Each loss is one pure function ``(PairLogps, PreferenceSettings) -> (loss, metrics)`` over
``P`` (chosen, rejected) pairs of answers to the same prompt, registered in
``PREFERENCE_LOSSES`` with whether it needs the frozen reference model's log-probs; the
DPO stages read that table (``preference_loss(name, ...)`` or ``PREFERENCE_LOSSES[name]``)
to decide whether to build a reference and which function to call. Every loss divides its
per-pair sum by the step's pair count and reports the same metrics (``_pair_metrics``).

This module computes no log-probabilities: the caller sums each answer's token log-probs.
KTO (unpaired answers) is ``kto.kto_loss``; a reward model's pairwise loss is
``reward_model.bradley_terry_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.functional import logsigmoid

from palaestra.options import PreferenceLossName
from palaestra.trainer.losses._checks import check_choice, check_shape, check_step_counts


@dataclass(frozen=True)
class PairLogps:
    """Log-probs of ``P`` answer pairs, each tensor of shape ``(P,)``."""

    chosen_P: torch.Tensor
    """The chosen answers' SUMMED token log-probs under the policy (with grad)."""
    rejected_P: torch.Tensor
    """The rejected answers' summed token log-probs under the policy (with grad)."""
    chosen_lengths_P: torch.Tensor
    """The chosen answers' token counts (IPO, SimPO and ORPO average over them)."""
    rejected_lengths_P: torch.Tensor
    """The rejected answers' token counts."""
    ref_chosen_P: torch.Tensor | None = None
    """The chosen answers' summed log-probs under the frozen reference; None for the
    reference-free losses."""
    ref_rejected_P: torch.Tensor | None = None
    """The rejected answers' summed log-probs under the frozen reference."""
    num_pairs: float | None = None
    """The WHOLE optimizer step's pair count (micro-batching); None: this call's ``P``."""

    def __post_init__(self) -> None:
        for name in ("rejected_P", "chosen_lengths_P", "rejected_lengths_P"):
            check_shape(name, getattr(self, name), self.chosen_P.shape)
        for name in ("ref_chosen_P", "ref_rejected_P"):
            if getattr(self, name) is not None:
                check_shape(name, getattr(self, name), self.chosen_P.shape)
        check_step_counts(num_pairs=self.num_pairs)


@dataclass(frozen=True)
class PreferenceSettings:
    """The coefficients of the preference losses (``dpo.*`` in the config)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward (ORPO: weight of the odds-ratio term); > 0."""
    label_smoothing: float = 0.0
    """cDPO's (and SimPO's) probability that a label is flipped; in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin; >= 0."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if not self.simpo_gamma >= 0:
            raise ValueError(f"simpo_gamma must be >= 0, got {self.simpo_gamma}.")


PairLossFn = Callable[[PairLogps, PreferenceSettings], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class PreferenceLoss:
    """One entry of ``PREFERENCE_LOSSES``."""

    name: PreferenceLossName
    """The name configs spell (``dpo.loss``)."""
    needs_reference: bool
    """Whether ``fn`` reads ``ref_chosen_P`` / ``ref_rejected_P`` (the stage then builds a
    frozen reference model)."""
    fn: PairLossFn
    """The loss: ``fn(pairs, settings) -> (loss, metrics)``."""


def dpo_sigmoid(
    pairs: PairLogps, settings: PreferenceSettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) with cDPO's label smoothing ``e``.

    With the log-ratios to the reference ``d = (c - c_ref) - (r - r_ref)`` (summed log-probs,
    each ``(P,)``) and ``s = sigmoid``: ``L = -(1 - e) log s(beta d) - e log s(-beta d)``;
    ``e`` is the chance a label is flipped. Implicit rewards: ``beta (c - c_ref)`` and
    ``beta (r - r_ref)``.
    """
    ratio_c_P, ratio_r_P = _log_ratios(pairs, "sigmoid")
    beta = settings.beta
    losses_P = _smoothed_logistic(beta * (ratio_c_P - ratio_r_P), settings.label_smoothing)
    return _pair_result(losses_P, beta * ratio_c_P, beta * ratio_r_P, pairs.num_pairs)


def ipo(pairs: PairLogps, settings: PreferenceSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17) on per-token log-ratios, as TRL does.

    ``d = (c - c_ref) / l_c - (r - r_ref) / l_r`` with ``l`` the answers' token counts (all
    ``(P,)``); ``L = (d - 1 / (2 beta))^2``: regresses the margin onto ``1 / (2 beta)``.
    Implicit rewards: ``beta (c - c_ref)`` and ``beta (r - r_ref)``.
    """
    ratio_c_P, ratio_r_P = _log_ratios(pairs, "ipo")
    length_c_P, length_r_P = _lengths(pairs)
    beta = settings.beta
    losses_P = (ratio_c_P / length_c_P - ratio_r_P / length_r_P - 1 / (2 * beta)) ** 2
    return _pair_result(losses_P, beta * ratio_c_P, beta * ratio_r_P, pairs.num_pairs)


def simpo(pairs: PairLogps, settings: PreferenceSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): reference-free, length-normalised.

    ``d = c / l_c - r / l_r`` (mean token log-probs, ``(P,)``), target margin ``gamma``:
    ``L = -(1 - e) log s(beta d - gamma) - e log s(-(beta d - gamma))``. Implicit rewards:
    ``beta c / l_c`` and ``beta r / l_r``.
    """
    c_P, r_P = pairs.chosen_P.float(), pairs.rejected_P.float()
    length_c_P, length_r_P = _lengths(pairs)
    beta = settings.beta
    logits_P = beta * (c_P / length_c_P - r_P / length_r_P) - settings.simpo_gamma
    losses_P = _smoothed_logistic(logits_P, settings.label_smoothing)
    return _pair_result(losses_P, beta * c_P / length_c_P, beta * r_P / length_r_P, pairs.num_pairs)


def orpo(pairs: PairLogps, settings: PreferenceSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO (Hong et al. 2024, arXiv:2403.07691): reference-free NLL plus odds ratio.

    With the mean token log-probs ``m_c = c / l_c``, ``m_r = r / l_r`` (``(P,)``) and
    ``log odds(m) = m - log(1 - exp(m))``:
    ``L = -m_c - beta log s(log odds(m_c) - log odds(m_r))``, the chosen answer's NLL plus the
    odds-ratio term. TRL averages the NLL over all chosen tokens of the batch; here it is
    each pair's mean, so the two agree when the chosen answers are equally long. Implicit
    rewards: ``beta m_c`` and ``beta m_r``.
    """
    c_P, r_P = pairs.chosen_P.float(), pairs.rejected_P.float()
    length_c_P, length_r_P = _lengths(pairs)
    beta = settings.beta
    mean_c_P, mean_r_P = c_P / length_c_P, r_P / length_r_P
    log_odds_P = (mean_c_P - _log1mexp(mean_c_P)) - (mean_r_P - _log1mexp(mean_r_P))
    losses_P = -mean_c_P - beta * logsigmoid(log_odds_P)
    return _pair_result(losses_P, beta * c_P / length_c_P, beta * r_P / length_r_P, pairs.num_pairs)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    entry.name: entry
    for entry in (
        PreferenceLoss("sigmoid", needs_reference=True, fn=dpo_sigmoid),
        PreferenceLoss("ipo", needs_reference=True, fn=ipo),
        PreferenceLoss("simpo", needs_reference=False, fn=simpo),
        PreferenceLoss("orpo", needs_reference=False, fn=orpo),
    )
}
"""The pairwise preference losses by the name configs spell (``options.PreferenceLossName``)."""


def preference_loss(
    name: str, pairs: PairLogps, settings: PreferenceSettings
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss ``name`` of ``PREFERENCE_LOSSES`` on ``pairs``; ValueError for an unknown name.

    Returns:
        ``(loss, metrics)``: the sum over pairs divided by ``pairs.num_pairs`` (default
        ``P``), and ``_pair_metrics``.
    """
    check_choice("preference loss", name, tuple(PREFERENCE_LOSSES))
    return PREFERENCE_LOSSES[name].fn(pairs, settings)


def _pair_result(
    losses_P: torch.Tensor,
    rewards_chosen_P: torch.Tensor,
    rewards_rejected_P: torch.Tensor,
    num_pairs: float | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-pair losses summed over pairs and divided by the step's pair count (so
    micro-batches add up to the whole batch's mean), with this call's metrics."""
    total = losses_P.sum() / (len(losses_P) if num_pairs is None else num_pairs)
    return total, _pair_metrics(losses_P, rewards_chosen_P, rewards_rejected_P)


def _pair_metrics(
    losses_P: torch.Tensor, rewards_chosen_P: torch.Tensor, rewards_rejected_P: torch.Tensor
) -> dict[str, float]:
    """Means over this call's pairs: ``loss``, the implicit rewards ``rewards/chosen`` and
    ``rewards/rejected``, their ``rewards/margin`` and ``rewards/accuracy`` (the fraction of
    pairs the rewards rank right)."""
    with torch.no_grad():
        margin_P = rewards_chosen_P - rewards_rejected_P
        return {
            "loss": losses_P.mean().item(),
            "rewards/chosen": rewards_chosen_P.mean().item(),
            "rewards/rejected": rewards_rejected_P.mean().item(),
            "rewards/margin": margin_P.mean().item(),
            "rewards/accuracy": (margin_P > 0).float().mean().item(),
        }


def _log_ratios(pairs: PairLogps, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c - c_ref, r - r_ref)`` in float32; ValueError when the reference is missing."""
    if pairs.ref_chosen_P is None or pairs.ref_rejected_P is None:
        raise ValueError(f"loss {name!r} needs the reference model's log-probs")
    return (
        pairs.chosen_P.float() - pairs.ref_chosen_P.float(),
        pairs.rejected_P.float() - pairs.ref_rejected_P.float(),
    )


def _lengths(pairs: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """The answers' token counts as floats, at least 1."""
    chosen_P = pairs.chosen_lengths_P.float().clamp(min=1)
    return chosen_P, pairs.rejected_lengths_P.float().clamp(min=1)


def _smoothed_logistic(logits_P: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``-(1 - e) log s(x) - e log s(-x)``: the logistic loss with flip probability ``e``."""
    return -(1 - smoothing) * logsigmoid(logits_P) - smoothing * logsigmoid(-logits_P)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x``."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
