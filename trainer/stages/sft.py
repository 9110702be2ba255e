"""SFT stage: supervised fine-tuning on chat data, loss on the assistant's tokens only.

The dataset loop (``stages.dataset``) runs it; what is SFT's own, top to bottom:

1. **data**: conversations from ``data.path``, tokenised with the chat template; the loss
   mask is 1 exactly on the assistant's tokens and their end-of-turn token
   (``trainer.data``). Held out: ``data.eval_path``, or ``data.eval_size`` rows of
   ``data.path``.
2. **step**: ``data.batch_size`` conversations, the token-mean negative log-likelihood
   (``losses.sft_loss``) over the step's assistant tokens; logged with the step's
   trained ``tokens`` and how many of its conversations were ``truncated``.
3. **held-out measure**: the mean NLL per assistant token of the held-out conversations
   before and after training (``eval/loss_before``, ``eval/loss_after``), beside the
   env's held-out accuracy if enabled, so a pipeline's report shows what SFT changed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from palaestra.rundir import RunDir
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.data import ChatEncoder, Encoded, read_sft, split_dataset, token_batch
from palaestra.trainer.learner import Learner
from palaestra.trainer.losses import sft_loss
from palaestra.trainer.stages.common import StageResult, load_policy, policy_learner
from palaestra.trainer.stages.dataset import DatasetStep, DatasetTask, run_dataset_stage

if TYPE_CHECKING:
    from palaestra.config import SFTStage


def run_sft(cfg: SFTStage, run: RunDir) -> StageResult:
    """Run an SFT stage as configured, writing into ``run``."""
    return run_dataset_stage(cfg, run, sft_task)


def sft_task(cfg: SFTStage, run: RunDir) -> DatasetTask:
    """Load the model and the conversations; SFT's steps and held-out measure."""
    model, tokenizer = load_policy(cfg, cfg.lora)
    train, held = load_sft_rows(cfg, ChatEncoder(tokenizer, cfg.data.max_length))
    learner = policy_learner(cfg, model, temperature=1.0)
    pad_id = tokenizer.pad_token_id

    def step(indices: Sequence[int]) -> DatasetStep:
        rows = [train[i] for i in indices]
        batch = token_batch(rows, pad_id)
        extra = {
            "tokens": float(batch.num_loss_tokens),
            "truncated": float(sum(r.truncated for r in rows)),
        }
        return DatasetStep(batch, _loss, extra)

    def held_out_measures(when: str) -> dict[str, float]:
        return {f"eval/loss_{when}": heldout_nll(learner, held, pad_id)} if held else {}

    return DatasetTask("sft", learner, tokenizer, len(train), step, held_out_measures)


def load_sft_rows(cfg: SFTStage, encoder: ChatEncoder) -> tuple[list[Encoded], list[Encoded]]:
    """Train and held-out rows of ``data.path`` (held out: ``data.eval_path``, else
    ``data.eval_size`` rows); prints how many were cut to ``data.max_length``."""
    train, held = split_dataset(cfg.data, cfg.seed, read_sft)
    train_rows = [encoder.encode(e.messages, e.train_from) for e in train]
    held_rows = [encoder.encode(e.messages, e.train_from) for e in held]
    cut = sum(r.truncated for r in train_rows + held_rows)
    if cut:
        print(
            f"[sft] {cut} conversations cut to data.max_length={encoder.max_length} tokens",
            file=sys.stderr,
        )
    return train_rows, held_rows


def heldout_nll(learner: Learner, rows: list[Encoded], pad_id: int, size: int = 16) -> float:
    """Mean negative log-likelihood per trained token of ``rows`` under the learner's model."""
    total, count = 0.0, 0.0
    for start in range(0, len(rows), size):
        batch = token_batch(rows[start : start + size], pad_id)
        logprobs_BT = learner.score(batch)
        total -= float((logprobs_BT * batch.loss_mask_BT).sum())
        count += float(batch.loss_mask_BT.sum())
    return total / max(count, 1.0)


def _loss(
    batch: TokenBatch, outputs: torch.Tensor, *, num_tokens: float, num_seqs: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The NLL of the assistant tokens; ``outputs`` are the learner's token log-probs."""
    return sft_loss(outputs, batch.loss_mask_BT, num_tokens=num_tokens)
