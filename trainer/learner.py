"""The learner: owns a model and its optimizer and takes one optimizer step per batch.

One class serves the policy, PPO's critic and the reward model alike. What differs is the
``forward`` it is built with (token log-probs, token values, last-token scores) and the
loss function each step gets; micro-batching, gradient accumulation, the warm-up schedule,
gradient clipping, precision, gradient checkpointing and metric weighting live here once.

``Learner.step(batch, loss_fn)`` runs the batch in micro-batches (``micro_batch_size`` rows,
or the step's own argument), accumulates gradients, clips the global gradient norm and
steps AdamW. The loss function receives the forward's output for the micro-batch and the
whole step's token and row counts, so a loss normalised by those counts gives the same
gradient however the batch is split.

Numerical guard. A step whose loss or global gradient norm is not finite (NaN or inf: a
bad reward or advantage, an overflow) is skipped: its gradients are dropped, neither AdamW
nor the warm-up schedule advances (a skipped step does not count as one of the warm-up's
steps), ``steps`` stays, and the metrics say ``nonfinite_step: 1`` with the loss and norm
as they came out. The weights are then exactly those before the step, so the stage loops
count skipped steps and stop after too many in a row (``stages.nonfinite``). The weights
are not checked after each step: with a finite, clipped gradient AdamW moves each weight
by about ``lr`` at most, so they stay finite unless ``lr`` is absurd (near float32's
1e38, or ``lr * weight_decay > 2``, where decay grows the weights each step);
``checkpoint.save_checkpoint`` refuses non-finite weights instead.

Policy log-probs (``token_logprobs``) are computed only where they are needed: the
decoder's hidden states are taken at the positions that predict trained tokens, and only
those rows go through the output projection; logits are divided by the sampling
temperature, as the engine does.

LoRA (``trainer.adapters``): a model with adapters trains them alone, as they are its only
parameters that require grad (AdamW, clipping and the gradient norm cover them only), and
``named_weights`` gives the engine the adapters only.

What this module does not do: rollouts, rewards, advantages or losses. It never sees an env.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from palaestra.models import Precision
from palaestra.trainer.adapters import adapter_weights, causal_lm, is_adapted
from palaestra.trainer.batch import TokenBatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from palaestra.config import TrainerConfig


Forward = Callable[[torch.nn.Module, TokenBatch], torch.Tensor]
"""What a learner computes from its model on a micro-batch: ``(B, T)`` per-token values
(log-probs, critic values) or ``(B,)`` per-row values (reward-model scores)."""


class LossFn(Protocol):
    """A loss over one micro-batch, normalised by counts of the whole step."""

    def __call__(
        self, batch: TokenBatch, outputs: torch.Tensor, /, *, num_tokens: float, num_seqs: float
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """How a learner optimises: AdamW, linear warm-up, clipping, micro-batching."""

    lr: float
    """AdamW learning rate (after warm-up)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value."""
    micro_batch_size: int = 16
    """Rows per forward/backward unless a step says otherwise."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (Hugging Face models)."""

    @classmethod
    def of(cls, trainer: TrainerConfig) -> OptimSettings:
        """The ``trainer`` section's settings."""
        return cls(
            lr=trainer.lr,
            betas=trainer.betas,
            weight_decay=trainer.weight_decay,
            warmup_steps=trainer.warmup_steps,
            max_grad_norm=trainer.max_grad_norm,
            micro_batch_size=trainer.micro_batch_size,
            gradient_checkpointing=trainer.gradient_checkpointing,
        )


def token_logprobs(
    model: torch.nn.Module, batch: TokenBatch, *, temperature: float = 1.0
) -> torch.Tensor:
    """Logprob of each token under ``model`` where ``batch.loss_mask_BT`` is 1, else 0.
    ``model`` is a Hugging Face causal LM, one with LoRA adapters, or a LoRA policy's
    reference (``adapters.AdaptersOff``)."""
    with causal_lm(model) as lm:
        hidden_BTH = lm.base_model(
            input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False
        ).last_hidden_state
        # Token t is predicted from position t-1.
        targets = batch.loss_mask_BT[:, 1:] > 0
        hidden_NH = hidden_BTH[:, :-1][targets]
        logits_NV = lm.get_output_embeddings()(hidden_NH).float() / temperature
    ids_N = batch.input_ids_BT[:, 1:][targets]
    picked_N = logits_NV.gather(1, ids_N[:, None]).squeeze(1) - logits_NV.logsumexp(dim=-1)
    out_BT = torch.zeros(batch.loss_mask_BT.shape, dtype=picked_N.dtype, device=picked_N.device)
    out_BT[:, 1:][targets] = picked_N
    return out_BT


def policy_forward(temperature: float) -> Forward:
    """The policy's forward: token log-probs at the sampling ``temperature``."""
    return functools.partial(token_logprobs, temperature=temperature)


class Learner:
    """A model, its AdamW optimizer and warm-up schedule; steps on token batches."""

    def __init__(
        self,
        model: torch.nn.Module | PreTrainedModel,
        settings: OptimSettings,
        *,
        forward: Forward,
        precision: Precision | None = None,
    ) -> None:
        """``precision``: the learner's autocast (``cfg.precision()``); None is float32."""
        self.model = model
        self.settings = settings
        self.forward = forward
        self.device = next(model.parameters()).device
        self.precision = precision
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable()  # type: ignore[operator]
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=settings.lr,
            betas=settings.betas,
            weight_decay=settings.weight_decay,
        )
        warmup = settings.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
        )
        self.steps = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context forward passes run in (bfloat16 autocast, or nothing for float32)."""
        return contextlib.nullcontext() if self.precision is None else self.precision.autocast()

    def step(
        self,
        batch: TokenBatch,
        loss_fn: LossFn,
        *,
        micro_batch_size: int | None = None,
        weigh_metrics_by: Literal["rows", "tokens"] = "rows",
    ) -> dict[str, float]:
        """One optimizer step over ``batch``: the loss metrics averaged over micro-batches
        (each weighted by its share of the step's rows or trained tokens), the gradient
        norm and the learning rate."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens, num_seqs = float(max(batch.num_loss_tokens, 1)), float(len(batch))
        totals: dict[str, float] = {}
        loss_sum = torch.zeros((), device=self.device)
        for micro in batch.micro_batches(micro_batch_size or self.settings.micro_batch_size):
            micro = micro.to(self.device)
            with self.autocast():
                outputs = self.forward(self.model, micro)
            loss, metrics = loss_fn(micro, outputs, num_tokens=num_tokens, num_seqs=num_seqs)
            loss.backward()
            loss_sum += loss.detach().float()
            if weigh_metrics_by == "rows":
                share = len(micro) / num_seqs
            else:
                share = float(micro.loss_mask_BT.sum()) / num_tokens
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + share * value
        grad_norm = self._gradient_norm()
        finite = math.isfinite(grad_norm) and bool(torch.isfinite(loss_sum))
        if finite:
            self._clip_gradients(grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.steps += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return totals | {
            "grad_norm": grad_norm,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "nonfinite_step": 0.0 if finite else 1.0,
        }

    def _gradient_norm(self) -> float:
        """The global L2 norm of the gradients (NaN or inf when any gradient is)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _clip_gradients(self, grad_norm: float) -> None:
        """Scale the gradients down to ``max_grad_norm`` when their norm is above it."""
        trained = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.tensor(grad_norm, device=self.device)
        torch.nn.utils.clip_grads_with_norm_(trained, self.settings.max_grad_norm, norm)

    @torch.no_grad()
    def score(
        self,
        batch: TokenBatch,
        *,
        model: torch.nn.Module | None = None,
        forward: Forward | None = None,
    ) -> torch.Tensor:
        """The forward's output on ``batch`` without grad, in float32 on the CPU: under the
        learner's model, or under ``model`` (e.g. a frozen reference) with ``forward``
        (default the learner's). ``(B, T)`` outputs are padded to the batch's width."""
        model = self.model if model is None else model
        forward = self.forward if forward is None else forward
        model.eval()
        parts = []
        for micro in batch.micro_batches(self.settings.micro_batch_size):
            with self.autocast():
                out = forward(model, micro.to(self.device)).float()
            if out.dim() == 2:
                out = torch.nn.functional.pad(out, (0, batch.input_ids_BT.shape[1] - out.shape[1]))
            parts.append(out.cpu())
        return torch.cat(parts)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The current weights by state-dict name, for the engine's ``update_weights``:
        every one, or of a model with LoRA adapters the adapters' only (nothing else
        trains)."""
        if is_adapted(self.model):
            yield from adapter_weights(self.model)
        else:
            yield from self.model.state_dict().items()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and the schedule's state and the step count (not the weights),
        for a training-state checkpoint (``trainer.train_state``)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict`` of a learner built with the same settings."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = int(state["steps"])
