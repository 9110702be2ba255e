"""PPO's critic: a language model's body with a scalar value head, and its optimiser.

The value of sampled token ``t`` is the critic's estimate of the return from the state
just before ``t`` was sampled: the head reads the hidden state at position ``t - 1``, the
position whose logits sampled ``t`` (as ``learner.token_logprobs`` does for log-probs).
Only sampled tokens get values; prompt, tool and env positions are 0.

The critic is a separate model from the policy (its own weights, AdamW and learning
rate, ``ppo.critic_lr``), started from the policy's starting weights or from
``ppo.critic_model`` (e.g. a reward model's checkpoint), with a fresh zero-initialised
head so every first value is 0.

What this module does not do: compute advantages (``advantages.gae``) or the value loss
(``losses.value_loss``); it calls the latter.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from palaestra.models import resolve_dtype
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.losses import value_loss


class Critic(torch.nn.Module):
    """A decoder body with a linear value head."""

    def __init__(self, body: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "cpu") -> Critic:
        """A critic whose body is the decoder of the model at ``name_or_path`` (a causal LM
        or a sequence classifier: only its base model is kept)."""
        from transformers import AutoModel

        from palaestra.models import resolve_model

        body = AutoModel.from_pretrained(resolve_model(name_or_path), dtype=torch.float32)
        return cls(body, body.config.hidden_size).to(device)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """Values of the sampled tokens of ``batch``, shape ``(B, T)``, 0 elsewhere."""
        hidden_BTH = self.body(
            input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False
        ).last_hidden_state
        values_BT = torch.zeros(batch.loss_mask_BT.shape, device=hidden_BTH.device)
        values_BT[:, 1:] = self.head(hidden_BTH[:, :-1]).squeeze(-1).float()
        return values_BT * batch.loss_mask_BT

    def save(self, path: str | Path) -> Path:
        """Save the body (Hugging Face format) and the head (``value_head.pt``) to ``path``."""
        path = Path(path)
        self.body.save_pretrained(path)  # type: ignore[operator]
        torch.save(self.head.state_dict(), path / "value_head.pt")
        return path


class CriticLearner:
    """AdamW on a critic: micro-batched, clipped, bf16 autocast like ``Learner``."""

    def __init__(
        self,
        critic: Critic,
        *,
        lr: float,
        clip: float | None,
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 16,
        dtype: str = "auto",
    ) -> None:
        self.critic, self.clip = critic, clip
        self.max_grad_norm, self.micro_batch_size = max_grad_norm, micro_batch_size
        self.device = next(critic.parameters()).device
        dtype = resolve_dtype(dtype, self.device)
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        self.optimizer = torch.optim.AdamW(critic.parameters(), lr=lr)
        self.steps = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def values(self, batch: TokenBatch) -> torch.Tensor:
        """The critic's values of ``batch``'s sampled tokens now, no grad, on the CPU."""
        self.critic.eval()
        parts = []
        for micro in batch.micro_batches(self.micro_batch_size):
            with self._autocast():
                values_BT = self.critic(micro.to(self.device))
            pad = batch.input_ids_BT.shape[1] - values_BT.shape[1]
            parts.append(torch.nn.functional.pad(values_BT.float(), (0, pad)).cpu())
        return torch.cat(parts)

    def step(
        self, batch: TokenBatch, returns_BT: torch.Tensor, old_values_BT: torch.Tensor
    ) -> dict[str, float]:
        """One optimizer step regressing the values of ``batch`` on ``returns_BT``."""
        self.critic.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = float(max(batch.num_loss_tokens, 1))
        totals: dict[str, float] = {}
        start = 0
        for micro in batch.micro_batches(self.micro_batch_size):
            rows, width = slice(start, start + len(micro)), micro.input_ids_BT.shape[1]
            start += len(micro)
            micro = micro.to(self.device)
            with self._autocast():
                values_BT = self.critic(micro)
            loss, metrics = value_loss(
                values_BT,
                old_values_BT[rows, :width].to(self.device),
                returns_BT[rows, :width].to(self.device),
                micro.loss_mask_BT,
                clip=self.clip,
                num_tokens=num_tokens,
            )
            loss.backward()
            share = float(micro.loss_mask_BT.sum()) / num_tokens
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + share * value
        grad_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        return {f"critic/{k}": v for k, v in totals.items()} | {
            "critic/grad_norm": float(grad_norm)
        }
