"""Token batches: trajectories padded into tensors the learner trains on.

A ``TokenBatch`` row is one training sample, right-padded: a whole trajectory, or one
segment of a trajectory the chat template split (``Trajectory.segment_starts``), so a row
is always one sequence the model was actually prompted with. ``episode_B[b]`` is the index
of the trajectory row ``b`` came from; every row of a trajectory carries its advantage.

Per-token tensors are aligned with ``input_ids_BT``: ``loss_mask_BT[b, t]`` says whether
token ``t`` was sampled, and ``old_logprobs_BT[b, t]`` is its behaviour logprob. The learner
scores token ``t`` from the logits at ``t - 1``, so position 0 never carries loss (it is
always prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from palaestra.agent.trajectory import Trajectory


@dataclass(frozen=True)
class TokenBatch:
    """Padded token tensors for one optimizer step (or one micro-batch of it)."""

    input_ids_BT: torch.Tensor
    """Token ids, right-padded with the pad id."""
    attention_mask_BT: torch.Tensor
    """1 on real tokens, 0 on padding."""
    loss_mask_BT: torch.Tensor
    """1.0 on sampled tokens (the ones trained on), 0.0 elsewhere."""
    old_logprobs_BT: torch.Tensor
    """Behaviour-policy logprobs of sampled tokens; 0 elsewhere."""
    advantages_B: torch.Tensor
    """One advantage per sequence, broadcast over its sampled tokens."""
    ref_logprobs_BT: torch.Tensor | None = None
    """Reference-model logprobs, when a KL term in the loss needs them."""
    is_weights_BT: torch.Tensor | None = None
    """Truncated importance weights from the sampling engine to the learner, when on."""
    token_advantages_BT: torch.Tensor | None = None
    """An advantage per token, when turns are credited separately; replaces ``advantages_B``
    in the loss."""
    episode_B: torch.Tensor | None = None
    """Index of the trajectory each row came from (``collate`` sets it); None for batches
    built by hand, one sequence per row."""

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        """Sampled tokens in the batch: the token-mean normaliser."""
        return int(self.loss_mask_BT.sum().item())

    def micro_batches(self, size: int) -> list[TokenBatch]:
        """Split into micro-batches of at most ``size`` rows, trimmed to their longest row."""
        out = []
        for start in range(0, len(self), size):
            rows = slice(start, start + size)
            length = int(self.attention_mask_BT[rows].sum(dim=1).max().item())
            cols = slice(0, length)
            out.append(
                TokenBatch(
                    input_ids_BT=self.input_ids_BT[rows, cols],
                    attention_mask_BT=self.attention_mask_BT[rows, cols],
                    loss_mask_BT=self.loss_mask_BT[rows, cols],
                    old_logprobs_BT=self.old_logprobs_BT[rows, cols],
                    advantages_B=self.advantages_B[rows],
                    ref_logprobs_BT=_slice(self.ref_logprobs_BT, rows, cols),
                    is_weights_BT=_slice(self.is_weights_BT, rows, cols),
                    token_advantages_BT=_slice(self.token_advantages_BT, rows, cols),
                    episode_B=None if self.episode_B is None else self.episode_B[rows],
                )
            )
        return out

    def with_ref_logprobs(self, ref_logprobs_BT: torch.Tensor) -> TokenBatch:
        return replace(self, ref_logprobs_BT=ref_logprobs_BT)

    def to(self, device: torch.device | str) -> TokenBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return TokenBatch(
            self.input_ids_BT.to(device),
            self.attention_mask_BT.to(device),
            self.loss_mask_BT.to(device),
            self.old_logprobs_BT.to(device),
            self.advantages_B.to(device),
            ref_logprobs_BT=move(self.ref_logprobs_BT),
            is_weights_BT=move(self.is_weights_BT),
            token_advantages_BT=move(self.token_advantages_BT),
            episode_B=move(self.episode_B),
        )

    def sum_per_episode(self, values_B: torch.Tensor, num_episodes: int) -> torch.Tensor:
        """Per-row values summed over each trajectory's rows: shape ``(num_episodes,)``
        (e.g. a KL per row into a KL per episode)."""
        if self.episode_B is None:
            return values_B
        sums_E = torch.zeros(num_episodes, dtype=values_B.dtype, device=values_B.device)
        return sums_E.index_add(0, self.episode_B.to(values_B.device), values_B)


def _slice(tensor_BT: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    return None if tensor_BT is None else tensor_BT[rows, cols]


def collate(
    trajectories: Sequence[Trajectory], advantages: Sequence[float], *, pad_id: int
) -> TokenBatch:
    """Pad trajectories into a ``TokenBatch``, one row per training sample, in the given
    order: one row per trajectory, or one per segment of a split trajectory, each with its
    trajectory's advantage. ``episode_B`` maps rows back to trajectories.

    Sort trajectories by length first when micro-batches should pad little.
    """
    if len(trajectories) != len(advantages):
        raise ValueError(
            f"collate got {len(trajectories)} trajectories but {len(advantages)} advantages"
        )
    if not trajectories:
        raise ValueError("collate got no trajectories")
    rows = _rows(trajectories)
    shape = (len(rows), max(end - start for _, start, end in rows))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape)
    old_logprobs = torch.zeros(shape)
    for row, (e, start, end) in enumerate(rows):
        t, n = trajectories[e], end - start
        input_ids[row, :n] = torch.tensor(t.token_ids[start:end])
        attention[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(t.loss_mask[start:end], dtype=torch.float32)
        old_logprobs[row, :n] = torch.tensor(t.logprobs[start:end], dtype=torch.float32)
    loss_mask[:, 0] = 0.0  # token 0 has no logits to be scored from
    episode_B = torch.tensor([e for e, _, _ in rows])
    advantages_B = torch.tensor([float(a) for a in advantages])[episode_B]
    return TokenBatch(
        input_ids, attention, loss_mask, old_logprobs, advantages_B, episode_B=episode_B
    )


def rows_of_token_values(
    trajectories: Sequence[Trajectory], values: Sequence[Sequence[float]]
) -> torch.Tensor:
    """Per-token values of each trajectory (one per token id) laid out as ``collate`` lays
    out the same trajectories: one row per training sample, right-padded with 0."""
    for t, v in zip(trajectories, values, strict=True):
        if len(v) != len(t.token_ids):
            raise ValueError(f"{len(v)} values for a trajectory of {len(t.token_ids)} tokens")
    rows = _rows(trajectories)
    out_BT = torch.zeros(len(rows), max(end - start for _, start, end in rows))
    for row, (e, start, end) in enumerate(rows):
        out_BT[row, : end - start] = torch.tensor(values[e][start:end], dtype=torch.float32)
    return out_BT


def token_values_of_rows(
    trajectories: Sequence[Trajectory], values_BT: torch.Tensor
) -> list[list[float]]:
    """The inverse of ``rows_of_token_values``: per-row values back to one list per
    trajectory, one value per token id."""
    out = [[0.0] * len(t.token_ids) for t in trajectories]
    for row, (e, start, end) in enumerate(_rows(trajectories)):
        out[e][start:end] = values_BT[row, : end - start].tolist()
    return out


def _rows(trajectories: Sequence[Trajectory]) -> list[tuple[int, int, int]]:
    """``(trajectory index, start, end)`` of every training sample, in row order."""
    return [(e, start, end) for e, t in enumerate(trajectories) for start, end in t.segments]
