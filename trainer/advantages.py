"""Group-relative advantages for GRPO, DAPO and Dr.GRPO.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) samples a group of G completions
for one prompt and uses the group itself as the baseline: each completion's advantage is
its reward minus the group's mean reward, divided by the group's standard deviation.
Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783) drops
the division because it up-weights groups whose rewards barely differ; here that is
``scale_by_std=False``, not a separate function.

Standard deviation convention: the unbiased estimate (Bessel's correction, divide by
``G - 1``), the one TRL's ``GRPOTrainer`` uses (``trl.trainer.utils.nanstd``). A group of
one completion has no spread and gets advantage 0. TRL adds ``1e-4`` to the std; our
default ``eps`` is ``1e-6``, pass ``eps=1e-4`` to reproduce TRL exactly.

This module computes one scalar advantage per completion. It does not spread advantages
over tokens, apply a KL penalty (see ``losses.kl_penalized_rewards``), or gather rewards
across processes: call it on the full set of groups, after any gather.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "grouped_advantages"]


def group_advantages(
    rewards_G: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages of the G completions of one prompt.

    GRPO:     ``A_i = (r_i - mean(r)) / (std(r) + eps)``, std unbiased (divides by G - 1).
    Dr.GRPO:  ``A_i = r_i - mean(r)`` (``scale_by_std=False``).

    A group whose rewards are all equal (or a group of one) gets all-zero advantages, never
    NaN.

    Args:
        rewards_G: shape ``(G,)``, one scalar reward per completion.
        scale_by_std: divide by the group's standard deviation (GRPO) or not (Dr.GRPO).
        eps: added to the std before dividing; must be positive when ``scale_by_std``.

    Returns:
        Advantages, shape ``(G,)``, floating point.
    """
    _check_rewards("rewards_G", rewards_G)
    _check_eps(eps, scale_by_std)
    rewards_G = _as_float(rewards_G)
    centered_G = rewards_G - rewards_G.mean()
    if not scale_by_std:
        return centered_G
    if rewards_G.numel() == 1:
        return torch.zeros_like(rewards_G)
    return centered_G / (rewards_G.std(correction=1) + eps)


def grouped_advantages(
    rewards_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``group_advantages`` applied to every group of a flat batch, in one vectorised pass.

    Completion ``n`` belongs to group ``group_ids_N[n]``; groups may have different sizes
    and need not be contiguous. Each completion's advantage uses only its own group's mean
    and (unbiased) std, exactly as ``group_advantages`` would on that group alone.

    Args:
        rewards_N: shape ``(N,)``, one scalar reward per completion.
        group_ids_N: shape ``(N,)``, integer group id per completion (e.g. a prompt index).
        scale_by_std: divide by each group's std (GRPO) or not (Dr.GRPO).
        eps: added to each group's std before dividing.

    Returns:
        Advantages, shape ``(N,)``, floating point, in the input order.
    """
    _check_rewards("rewards_N", rewards_N)
    _check_eps(eps, scale_by_std)
    if group_ids_N.shape != rewards_N.shape:
        raise ValueError(
            f"group_ids_N must have the shape of rewards_N {tuple(rewards_N.shape)}, "
            f"got {tuple(group_ids_N.shape)}."
        )
    if group_ids_N.is_floating_point() or group_ids_N.is_complex():
        raise ValueError(f"group_ids_N must hold integer ids, got dtype {group_ids_N.dtype}.")
    rewards_N = _as_float(rewards_N)
    _, group_of_N, sizes_K = torch.unique(group_ids_N, return_inverse=True, return_counts=True)
    sizes_K = sizes_K.to(rewards_N.dtype)
    sums_K = rewards_N.new_zeros(sizes_K.shape).index_add_(0, group_of_N, rewards_N)
    centered_N = rewards_N - (sums_K / sizes_K)[group_of_N]
    if not scale_by_std:
        return centered_N
    squares_K = rewards_N.new_zeros(sizes_K.shape).index_add_(0, group_of_N, centered_N**2)
    # A group of one has squares 0, so its std is 0 and its (zero) advantage stays 0.
    std_K = (squares_K / (sizes_K - 1).clamp(min=1)).sqrt()
    return centered_N / (std_K[group_of_N] + eps)


def _check_rewards(name: str, rewards: torch.Tensor) -> None:
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D tensor (one reward per completion), "
            f"got shape {tuple(rewards.shape)}."
        )


def _check_eps(eps: float, scale_by_std: bool) -> None:
    if scale_by_std and not eps > 0:
        raise ValueError(f"eps must be > 0 when scale_by_std=True (it guards 0/0), got {eps}.")


def _as_float(rewards: torch.Tensor) -> torch.Tensor:
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
