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

Multi-turn episodes with per-turn rewards can instead credit each turn with what follows
it (``grouped_turn_advantages``): the return-to-go from the turn, minus the mean
return-to-go at the same turn index in the group. On single-turn episodes this is exactly
GRPO's advantage.

PPO's advantages come from a learned critic instead of a group: ``gae`` runs generalised
advantage estimation over the tokens the model sampled.

This module does not spread advantages over tokens, apply a KL penalty (see ``losses.kl_penalized_rewards``), or gather rewards
across processes: call it on the full set of groups, after any gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "gae",
    "group_advantages",
    "grouped_advantages",
    "grouped_turn_advantages",
    "overlong_penalty",
    "reinforce_pp_advantages",
    "rloo_advantages",
]


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
    centered_N, std_N = _centered_and_std(_as_float(rewards_N), group_ids_N)
    if not scale_by_std:
        return centered_N
    return centered_N / (std_N + eps)


def overlong_penalty(
    lengths_N: torch.Tensor, *, max_length: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the rewards of over-long answers::

        0                                      if L <= max_length - buffer
        factor * (max_length - buffer - L) / buffer   if max_length - buffer < L <= max_length
        -factor                                if L > max_length

    ``L`` is an answer's sampled-token count; the penalty grows linearly over the last
    ``buffer`` tokens before ``max_length``.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer must be in (0, max_length={max_length}], got {buffer}")
    lengths_N = lengths_N.to(torch.float32)
    soft_N = (max_length - buffer - lengths_N) / buffer
    return factor * soft_N.clamp(min=-1.0, max=0.0)


def rloo_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740): each completion's
    baseline is the mean reward of the *other* completions of its group::

        A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))

    A group of one has no other completion and gets advantage 0.
    """
    centered_N = grouped_advantages(rewards_N, group_ids_N, scale_by_std=False)
    _, group_of_N, sizes_K = torch.unique(group_ids_N, return_inverse=True, return_counts=True)
    sizes_N = sizes_K[group_of_N].to(centered_N.dtype)
    return torch.where(sizes_N > 1, centered_N * sizes_N / (sizes_N - 1).clamp(min=1), 0.0)


def reinforce_pp_advantages(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++ with a group baseline (Hu et al. 2025, arXiv:2501.03262): subtract the
    group's mean reward, then whiten over the whole batch (mean 0, unbiased std 1), which
    keeps the scale of every group's advantages comparable without a per-group std."""
    _check_eps(eps, scale_by_std=True)
    centered_N = grouped_advantages(rewards_N, group_ids_N, scale_by_std=False)
    if centered_N.numel() < 2:
        return centered_N - centered_N.mean()
    return (centered_N - centered_N.mean()) / (centered_N.std(correction=1) + eps)


def grouped_turn_advantages(
    returns_to_go: Sequence[Sequence[float]],
    group_ids_N: torch.Tensor,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> list[torch.Tensor]:
    """Per-turn advantages of multi-turn episodes from their per-turn rewards.

    ``returns_to_go[n][k]`` is the sum of episode ``n``'s step rewards from its turn ``k``
    on. Turn ``k`` of episode ``n`` in group ``g`` gets::

        A_nk = (G_nk - mean{G_mk : m in g, m has a turn k}) / (std{G_m0 : m in g} + eps)

    a baseline per turn index (REINFORCE with a time-dependent baseline), scaled by the
    group's spread of whole-episode returns (not with ``scale_by_std=False``). A turn is
    credited with what happened from it on, not with rewards earned before it. With one
    turn per episode this equals ``grouped_advantages`` on the episode rewards.

    Returns:
        One tensor per episode, of its turns' advantages.
    """
    _check_eps(eps, scale_by_std)
    if group_ids_N.shape != (len(returns_to_go),):
        raise ValueError(
            f"group_ids_N must hold one id per episode ({len(returns_to_go)}), "
            f"got shape {tuple(group_ids_N.shape)}."
        )
    if any(len(returns) == 0 for returns in returns_to_go):
        raise ValueError("every episode needs at least one turn to credit")
    turn_of, episode_of, values = [], [], []
    for n, returns in enumerate(returns_to_go):
        for k, value in enumerate(returns):
            turn_of.append(k)
            episode_of.append(n)
            values.append(float(value))
    episode_M = torch.tensor(episode_of)
    turn_M = torch.tensor(turn_of)
    # one baseline per (group, turn index): a combined id for each pair
    _, group_N = torch.unique(group_ids_N, return_inverse=True)
    pair_M = group_N[episode_M] * (int(turn_M.max()) + 1) + turn_M
    centered_M, _ = _centered_and_std(torch.tensor(values, dtype=torch.float64), pair_M)
    if scale_by_std:
        first_N = torch.tensor([float(r[0]) for r in returns_to_go], dtype=torch.float64)
        _, std_N = _centered_and_std(first_N, group_ids_N)
        centered_M = centered_M / (std_N[episode_M] + eps)
    advantages = centered_M.to(torch.float32)
    return [advantages[episode_M == n] for n in range(len(returns_to_go))]


def gae(
    rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the tokens the model sampled (Schulman et al.
    2016, arXiv:1506.02438).

    Each row's sampled tokens (``mask_BT`` 1) are the steps of one episode, in order; the
    other positions (prompt, tool results, env messages, padding) are not steps: the
    recursion goes from one sampled token straight to the next, so a tool reply between
    two assistant turns neither gets a value nor breaks the bootstrapping. With ``t'`` the
    next sampled token after ``t`` and ``V = 0`` after the last one (the episode ends)::

        delta_t = r_t + gamma * V_t' - V_t
        A_t     = delta_t + gamma * lam * A_t'
        R_t     = A_t + V_t            (the critic's regression target)

    ``lam = 1`` gives Monte Carlo returns minus values, ``lam = 0`` one-step TD errors.

    Args:
        rewards_BT: reward at each sampled token (the episode's or turn's reward on its
            last token, any per-token penalty on every token); 0 elsewhere.
        values_BT: the critic's value of the state before each sampled token.
        mask_BT: 1 on sampled tokens.
        gamma: discount per sampled token, in [0, 1].
        lam: GAE's lambda, in [0, 1].

    Returns:
        ``(advantages_BT, returns_BT)``, 0 where ``mask_BT`` is 0. Computed without grad.
    """
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
    if rewards_BT.shape != values_BT.shape or rewards_BT.shape != mask_BT.shape:
        raise ValueError("rewards_BT, values_BT and mask_BT must have the same shape")
    keep_BT = mask_BT.bool()
    with torch.no_grad():
        advantages_BT = torch.zeros_like(values_BT, dtype=torch.float32)
        next_value_B = torch.zeros(values_BT.shape[0])
        next_advantage_B = torch.zeros(values_BT.shape[0])
        for t in reversed(range(values_BT.shape[1])):
            step_B = keep_BT[:, t]
            value_B = values_BT[:, t].float()
            delta_B = rewards_BT[:, t].float() + gamma * next_value_B - value_B
            advantage_B = delta_B + gamma * lam * next_advantage_B
            advantages_BT[:, t] = torch.where(step_B, advantage_B, 0.0)
            next_value_B = torch.where(step_B, value_B, next_value_B)
            next_advantage_B = torch.where(step_B, advantage_B, next_advantage_B)
        returns_BT = torch.where(keep_BT, advantages_BT + values_BT.float(), 0.0)
    return advantages_BT, returns_BT


def _centered_and_std(
    values_N: torch.Tensor, group_ids_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each value minus its group's mean, and its group's unbiased std (0 for a group of one)."""
    _, group_of_N, sizes_K = torch.unique(group_ids_N, return_inverse=True, return_counts=True)
    sizes_K = sizes_K.to(values_N.dtype)
    sums_K = values_N.new_zeros(sizes_K.shape).index_add_(0, group_of_N, values_N)
    centered_N = values_N - (sums_K / sizes_K)[group_of_N]
    squares_K = values_N.new_zeros(sizes_K.shape).index_add_(0, group_of_N, centered_N**2)
    # A group of one has squares 0, so its std is 0 and its (zero) advantage stays 0.
    std_K = (squares_K / (sizes_K - 1).clamp(min=1)).sqrt()
    return centered_N, std_K[group_of_N]


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
