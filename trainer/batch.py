"""Token batches: trajectories and dataset rows padded into tensors the learner trains on.

A ``TokenBatch`` row is one training sample, right-padded: a whole trajectory, or one
segment of a trajectory the chat template split (``Trajectory.segment_starts``), so a row
is always one sequence the model was actually prompted with. ``episode_B[b]`` is the index
of the trajectory row ``b`` came from.

Per-token tensors (``*_BT``) are aligned with ``input_ids_BT``: ``loss_mask_BT[b, t]`` says
whether token ``t`` is trained on, ``old_logprobs_BT[b, t]`` is its behaviour logprob and
``advantages_BT[b, t]`` its advantage, computed before collation (a per-episode advantage
is spread over the episode's sampled tokens here). The learner scores token ``t`` from the
logits at ``t - 1``, so position 0 never carries loss (it is always prompt).

Only the tensors a stage needs are set: a dataset batch has no behaviour logprobs, a
policy batch no returns. Micro-batching and device moves handle every field alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

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
    """1.0 on the tokens trained on (sampled, or the answer of a dataset row), 0.0 elsewhere."""
    old_logprobs_BT: torch.Tensor | None = None
    """Behaviour-policy logprobs of sampled tokens (0 elsewhere); after the behaviour
    correction, the learner's own logprobs before the step (the proximal policy)."""
    advantages_BT: torch.Tensor | None = None
    """The advantage of each sampled token (0 elsewhere)."""
    ref_logprobs_BT: torch.Tensor | None = None
    """Reference-model logprobs, when a KL term or a preference loss needs them."""
    is_weights_BT: torch.Tensor | None = None
    """Truncated importance weights from the sampling engine to the learner, when on."""
    old_values_BT: torch.Tensor | None = None
    """The critic's values at sampling time (PPO), the value loss's clip centre."""
    returns_BT: torch.Tensor | None = None
    """The critic's regression targets (PPO's GAE returns)."""
    labels_B: torch.Tensor | None = None
    """A label per row, for losses over labelled rows (KTO: 1 desirable, 0 undesirable)."""
    episode_B: torch.Tensor | None = None
    """Index of the trajectory each row came from (``collate`` sets it); None for batches
    built from dataset rows, one sequence per row."""

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        """Tokens trained on in the batch: the token-mean normaliser."""
        return int(self.loss_mask_BT.sum().item())

    def micro_batches(self, size: int) -> list[TokenBatch]:
        """Split into micro-batches of at most ``size`` rows, trimmed to their longest row."""
        out = []
        for start in range(0, len(self), size):
            rows = slice(start, start + size)
            length = int(self.attention_mask_BT[rows].sum(dim=1).max().item())
            out.append(self._map(functools.partial(_cut, rows=rows, cols=slice(0, length))))
        return out

    def to(self, device: torch.device | str) -> TokenBatch:
        return self._map(lambda _, t: t.to(device))

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TokenBatch:
        """A batch with ``fn(name, tensor)`` applied to every tensor that is set."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        mapped = {k: None if v is None else fn(k, v) for k, v in values.items()}
        return TokenBatch(**mapped)  # type: ignore[arg-type]

    def sum_per_episode(self, values_B: torch.Tensor, num_episodes: int) -> torch.Tensor:
        """Per-row values summed over each trajectory's rows: shape ``(num_episodes,)``
        (e.g. a KL per row into a KL per episode)."""
        if self.episode_B is None:
            return values_B
        sums_E = torch.zeros(num_episodes, dtype=values_B.dtype, device=values_B.device)
        return sums_E.index_add(0, self.episode_B.to(values_B.device), values_B)

    def with_ref_logprobs(self, ref_logprobs_BT: torch.Tensor) -> TokenBatch:
        return replace(self, ref_logprobs_BT=ref_logprobs_BT)

    def with_episode_advantages(self, advantages_E: torch.Tensor) -> TokenBatch:
        """This collated batch with each episode's advantage on its trained tokens."""
        if self.episode_B is None:
            raise ValueError("the batch was not built by collate: it has no episode_B")
        return replace(
            self, advantages_BT=advantages_E[self.episode_B][:, None] * self.loss_mask_BT
        )

    def with_token_advantages(
        self, trajectories: Sequence[Trajectory], values: Sequence[Sequence[float]]
    ) -> TokenBatch:
        """This batch, collated from ``trajectories``, with one advantage per token id of
        each trajectory (kept on trained tokens only)."""
        advantages_BT = rows_of_token_values(trajectories, values) * self.loss_mask_BT
        return replace(self, advantages_BT=advantages_BT)


def _cut(name: str, tensor: torch.Tensor, *, rows: slice, cols: slice) -> torch.Tensor:
    return tensor[rows, cols] if name.endswith("_BT") else tensor[rows]


def collate(
    trajectories: Sequence[Trajectory],
    *,
    pad_id: int,
    advantages: Sequence[float] | None = None,
    token_advantages: Sequence[Sequence[float]] | None = None,
) -> TokenBatch:
    """Pad trajectories into a ``TokenBatch``, one row per training sample, in the given
    order: one row per trajectory, or one per segment of a split trajectory.

    ``advantages`` (one per trajectory, spread over its sampled tokens) or
    ``token_advantages`` (one per token id of each trajectory) fill ``advantages_BT``;
    without either it is left unset. ``episode_B`` maps rows back to trajectories. Sort
    trajectories by length first when micro-batches should pad little.
    """
    if not trajectories:
        raise ValueError("collate got no trajectories")
    rows = _rows(trajectories)
    loss_mask = rows_of_token_values(trajectories, [t.loss_mask for t in trajectories])
    loss_mask[:, 0] = 0.0  # token 0 has no logits to be scored from
    attention = rows_of_token_values(trajectories, [[1] * len(t.token_ids) for t in trajectories])
    input_ids = torch.full(loss_mask.shape, pad_id, dtype=torch.long)
    for row, (e, start, end) in enumerate(rows):
        input_ids[row, : end - start] = torch.tensor(trajectories[e].token_ids[start:end])
    batch = TokenBatch(
        input_ids,
        attention.long(),
        loss_mask,
        old_logprobs_BT=rows_of_token_values(trajectories, [t.logprobs for t in trajectories]),
        episode_B=torch.tensor([e for e, _, _ in rows]),
    )
    if advantages is not None and token_advantages is not None:
        raise ValueError("collate takes advantages or token_advantages, not both")
    if advantages is not None:
        if len(advantages) != len(trajectories):
            raise ValueError(
                f"collate got {len(trajectories)} trajectories but {len(advantages)} advantages"
            )
        return batch.with_episode_advantages(torch.tensor([float(a) for a in advantages]))
    if token_advantages is not None:
        return batch.with_token_advantages(trajectories, token_advantages)
    return batch


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
