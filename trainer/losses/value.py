"""PPO's value loss: the critic's regression onto returns, optionally clipped.

The critic (``trainer.critic``) calls ``value_loss`` on its per-token values; returns come
from GAE in ``trainer.advantages``. Nothing here runs a model or computes returns.
"""

from __future__ import annotations

import torch

from palaestra.trainer.losses._checks import check_token_tensors


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
        values_BT: the critic's values now (with grad), ``(B, T)``.
        old_values_BT: its values when the batch was sampled (no grad), ``(B, T)``.
        returns_BT: the regression targets (GAE returns, ``advantages + old values``).
        mask_BT: 1 on sampled tokens, the only positions with values.
        clip: the clip range ``c``, or None for an unclipped squared error.
        num_tokens: the normaliser (the step's sampled tokens); default this call's count.

    Returns:
        ``(loss, metrics)``; see ``_value_metrics``.
    """
    check_token_tensors(
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
    return loss, _value_metrics(
        total.item() / here, values_BT, old_values_BT, returns_BT, keep_BT, clip
    )


def _value_metrics(
    mean_loss: float,
    values_BT: torch.Tensor,
    old_values_BT: torch.Tensor,
    returns_BT: torch.Tensor,
    keep_BT: torch.Tensor,
    clip: float | None,
) -> dict[str, float]:
    """This call's ``value_loss`` per token, ``value_clip_frac`` (share of tokens whose value
    moved more than ``clip``) and ``explained_variance`` (``1 - Var(R - V) / Var(R)``)."""
    with torch.no_grad():
        v, r = values_BT[keep_BT].float(), returns_BT[keep_BT].float()
        clip_frac = 0.0
        if clip is not None:
            moved_BT = (values_BT - old_values_BT).abs() > clip
            clip_frac = float(moved_BT[keep_BT].float().mean())
        explained = float(1 - (r - v).var() / r.var()) if r.numel() > 1 and r.var() > 0 else 0.0
        return {
            "value_loss": mean_loss,
            "value_clip_frac": clip_frac,
            "explained_variance": explained,
        }
