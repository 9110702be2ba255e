"""Supervised fine-tuning: the negative log-likelihood of target tokens.

One loss, ``sft_loss``, over log-probs the learner computed; the SFT stage decides which
tokens are targets (the assistant's) through the mask. No model, no tokenizer here.
"""

from __future__ import annotations

import torch

from palaestra.trainer.losses._checks import check_token_tensors


def sft_loss(
    logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, *, num_tokens: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning: the negative log-likelihood of the target tokens.

    ``L = -sum_t mask_t * log pi(x_t) / num_tokens``: a token mean over the step's target
    tokens (assistant tokens of a chat), so micro-batches add up to the whole batch's mean.

    Args:
        logprobs_BT: log-probs of the target sequence's tokens, ``(B, T)``, with grad.
        mask_BT: 1 on target tokens, ``(B, T)``.
        num_tokens: the step's target-token count (micro-batching); default this call's.

    Returns:
        ``(loss, {"loss": this call's mean NLL per target token})``.
    """
    check_token_tensors(logprobs_BT, mask_BT=mask_BT)
    keep_BT = mask_BT.bool()
    nll = -torch.where(keep_BT, logprobs_BT, 0.0).sum()
    count = float(keep_BT.sum().clamp(min=1))
    loss = nll / (count if num_tokens is None else num_tokens)
    return loss, {"loss": nll.item() / count}
