"""The learner: owns the model and optimizer and takes one optimizer step per batch.

``Learner.step(batch, loss_fn)`` runs the batch in micro-batches, accumulates gradients,
clips the global gradient norm and steps AdamW. The loss function receives the current
per-token logprobs and the whole batch's token and sequence counts, so a loss normalised
by those counts gives the same gradient however the batch is split.

Logprobs are computed only where they are needed: the decoder's hidden states are taken at
the positions that predict sampled tokens, and only those rows go through the output
projection. Logits are divided by the sampling temperature, as the engine does.

What this module does not do: rollouts, rewards or advantages. It never sees an env.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch

from palaestra.models import resolve_dtype
from palaestra.trainer.batch import TokenBatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class LossFn(Protocol):
    """A loss over one micro-batch, normalised by counts of the whole step."""

    def __call__(
        self, batch: TokenBatch, logprobs_BT: torch.Tensor, *, num_tokens: float, num_seqs: float
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


def token_logprobs(
    model: PreTrainedModel, batch: TokenBatch, *, temperature: float = 1.0
) -> torch.Tensor:
    """Logprob of each token under ``model`` where ``batch.loss_mask_BT`` is 1, else 0."""
    hidden_BTH = model.base_model(
        input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False
    ).last_hidden_state
    # Token t is predicted from position t-1.
    targets = batch.loss_mask_BT[:, 1:] > 0
    hidden_NH = hidden_BTH[:, :-1][targets]
    logits_NV = model.get_output_embeddings()(hidden_NH).float() / temperature
    ids_N = batch.input_ids_BT[:, 1:][targets]
    picked_N = logits_NV.gather(1, ids_N[:, None]).squeeze(1) - logits_NV.logsumexp(dim=-1)
    out_BT = torch.zeros(batch.loss_mask_BT.shape, dtype=picked_N.dtype, device=picked_N.device)
    out_BT[:, 1:][targets] = picked_N
    return out_BT


class Learner:
    """Model, AdamW optimizer and warm-up schedule; steps on token batches."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 16,
        dtype: str = "auto",
        temperature: float = 1.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        dtype = resolve_dtype(dtype, self.device)
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1))
        )
        self.steps = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over ``batch``; returns the loss metrics and the grad norm."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens, num_seqs = float(max(batch.num_loss_tokens, 1)), float(len(batch))
        totals: dict[str, float] = {}
        for micro in batch.micro_batches(self.micro_batch_size):
            micro = micro.to(self.device)
            with self.autocast():
                logprobs_BT = token_logprobs(self.model, micro, temperature=self.temperature)
            loss, metrics = loss_fn(micro, logprobs_BT, num_tokens=num_tokens, num_seqs=num_seqs)
            loss.backward()
            share = len(micro) / len(batch)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + share * value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = float(self.scheduler.get_last_lr()[0])
        return totals

    @torch.no_grad()
    def score(self, model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
        """Per-token logprobs of ``batch`` under ``model`` (e.g. the reference), no grad."""
        model.eval()
        parts = []
        for micro in batch.micro_batches(self.micro_batch_size):
            with self.autocast():
                lp = token_logprobs(model, micro.to(self.device), temperature=self.temperature)
            pad = batch.input_ids_BT.shape[1] - lp.shape[1]
            parts.append(torch.nn.functional.pad(lp, (0, pad)).cpu())
        return torch.cat(parts)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights by state-dict name, for the engine's ``update_weights``."""
        yield from self.model.state_dict().items()
