"""PPO's critic: a language model's body with a scalar value head.

The value of sampled token ``t`` is the critic's estimate of the return from the state
just before ``t`` was sampled: the head reads the hidden state at position ``t - 1``, the
position whose logits sampled ``t`` (as ``learner.token_logprobs`` does for log-probs).
Only sampled tokens get values; prompt, tool and env positions are 0.

The critic is a separate model from the policy (its own weights, AdamW and learning
rate, ``ppo.critic_lr``), started from the policy's starting weights or from
``ppo.critic_model`` (e.g. a reward model's checkpoint), with a fresh zero-initialised
head so every first value is 0.

The critic trains through the same ``Learner`` as the policy (``stages.ppo`` builds it
with ``Critic.forward`` as its forward). What this module does not do: optimise, compute
advantages (``advantages.gae``) or the value loss (``losses.value_loss``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.checkpoint import check_finite_weights


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
        """Save the body (Hugging Face format) and the head (``value_head.pt``) to ``path``;
        non-finite weights are refused (``checkpoint.check_finite_weights``)."""
        check_finite_weights(self)
        path = Path(path)
        self.body.save_pretrained(path)  # type: ignore[operator]
        torch.save(self.head.state_dict(), path / "value_head.pt")
        return path
