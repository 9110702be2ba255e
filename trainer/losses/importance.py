"""Truncated importance weights from the engine that sampled to the learner's policy.

The engine that sampled a token (the behaviour policy ``mu``, possibly some versions old,
possibly in another precision or kernel) is not the learner's policy before the step (the
proximal policy ``pi_prox``). ``behaviour_weights`` turns the two log-probs into per-token
weights that ``PolicyLossInputs.is_weights_BT`` carries into the policy loss (decoupled
PPO), and into metrics of the mismatch. It computes neither set of log-probs.
"""

from __future__ import annotations

import torch

from palaestra.options import IS_LEVELS, ISLevel
from palaestra.trainer.losses._checks import check_choice, check_token_tensors


def behaviour_weights(
    proximal_logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    cap: float = 2.0,
    level: ISLevel = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights from the sampling engine to the learner, and mismatch metrics.

    Truncated importance sampling (Ionides 2008; as used for RL on LLMs with asynchronous or
    mismatched inference) weighs each token by::

        token:     w_it = min(pi_prox(y_it) / mu(y_it), cap)
        sequence:  w_i  = min(prod_t pi_prox(y_it) / mu(y_it), cap)   (same for all t of i)

    computed without grad; 0 at masked positions.

    Args:
        proximal_logprobs_BT: the learner's log-probs before the step, ``(B, T)``.
        behaviour_logprobs_BT: the engine's log-probs of the same tokens, ``(B, T)``.
        mask_BT: 1 on sampled tokens.
        cap: truncation level ``C >= 1``.
        level: ``"token"`` or ``"sequence"``.

    Returns:
        ``(weights_BT, metrics)``; see ``_mismatch_metrics`` for the metrics.
    """
    check_token_tensors(
        proximal_logprobs_BT, mask_BT=mask_BT, behaviour_logprobs_BT=behaviour_logprobs_BT
    )
    check_choice("level", level, IS_LEVELS)
    if cap < 1:
        raise ValueError(
            f"cap must be >= 1 (a weight cap below 1 down-weights agreement), got {cap}"
        )
    with torch.no_grad():
        keep_BT = mask_BT.bool()
        delta_BT = torch.where(keep_BT, proximal_logprobs_BT - behaviour_logprobs_BT, 0.0)
        log_w_BT = delta_BT
        if level == "sequence":
            log_w_BT = delta_BT.sum(dim=1, keepdim=True).expand_as(delta_BT)
        raw_BT = torch.exp(log_w_BT)
        weights_BT = raw_BT.clamp(max=cap) * keep_BT.to(raw_BT.dtype)
        return weights_BT, _mismatch_metrics(delta_BT, raw_BT, keep_BT, cap)


def _mismatch_metrics(
    delta_BT: torch.Tensor, raw_BT: torch.Tensor, keep_BT: torch.Tensor, cap: float
) -> dict[str, float]:
    """Over the sampled tokens: ``mismatch/abs_dlogprob`` (mean ``|log pi_prox - log mu|``),
    ``mismatch/ess`` (normalised effective sample size of the untruncated weights,
    ``(sum w)^2 / (n sum w^2)``, 1 when the two policies agree) and ``mismatch/capped_frac``
    (share of weights the cap truncated)."""
    n = keep_BT.to(delta_BT.dtype).sum().clamp(min=1)
    raw = raw_BT[keep_BT]
    ess = (raw.sum() ** 2 / (n * (raw**2).sum())).item() if raw.numel() else 1.0
    return {
        "mismatch/abs_dlogprob": (delta_BT.abs().sum() / n).item(),
        "mismatch/ess": ess,
        "mismatch/capped_frac": ((raw_BT > cap) & keep_BT).sum().item() / n.item(),
    }
