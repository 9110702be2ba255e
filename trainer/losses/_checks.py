"""Input checks shared by the losses: each raises a ``ValueError`` naming the argument.

The losses are called from stage code with tensors built far away, so a wrong shape or an
unknown option must fail at the call with the argument's name and what was expected, not
deep inside a broadcast. These helpers only check; they change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def check_shape(name: str, tensor: torch.Tensor, expected: torch.Size | tuple[int, ...]) -> None:
    """Raise unless ``tensor`` has exactly the ``expected`` shape."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}.")


def check_token_tensors(logprobs_BT: torch.Tensor, **others_BT: torch.Tensor | None) -> None:
    """Raise unless ``logprobs_BT`` is ``(B, T)`` and every other given tensor has its shape."""
    if logprobs_BT.dim() != 2:
        raise ValueError(
            f"logprobs_BT must be 2-D (batch, tokens), got shape {tuple(logprobs_BT.shape)}."
        )
    for name, tensor in others_BT.items():
        if tensor is not None:
            check_shape(name, tensor, logprobs_BT.shape)


def check_step_counts(**counts: float | None) -> None:
    """Raise unless each micro-batching count is None (this batch's own) or positive."""
    for name, value in counts.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 (or None for this batch's count), got {value}.")
