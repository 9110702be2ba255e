"""SFT stage: supervised fine-tuning on chat data, loss on the assistant's tokens only.

One step, top to bottom:

1. **batch**: ``data.batch_size`` conversations from ``data.path`` (cycled, reshuffled each
   pass), tokenised with the chat template; the loss mask is 1 exactly on the assistant's
   tokens and their end-of-turn token (``trainer.data``).
2. **learner.step**: token-mean negative log-likelihood (``losses.sft_loss``) over the
   step's assistant tokens, micro-batched, clipped, AdamW.
3. **log / checkpoint**.

Before and after training: the mean NLL per assistant token on held-out conversations
(``data.eval_path`` or ``data.eval_size`` rows of ``data.path``) and, if enabled, the env's
held-out accuracy, so a pipeline's report shows what SFT changed.
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch
from tqdm import tqdm

from palaestra.config import TrainConfig
from palaestra.models import load_model, resolve_model
from palaestra.rundir import RunDir
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.data import (
    ChatEncoder,
    Encoded,
    batch_indices,
    held_out,
    read_sft,
    token_batch,
)
from palaestra.trainer.learner import Learner
from palaestra.trainer.losses import sft_loss
from palaestra.trainer.stages.common import (
    StageResult,
    build_learner,
    end_step,
    evaluate_model,
    save_interrupted,
)


def run_sft(cfg: TrainConfig, run: RunDir) -> StageResult:
    """Run an SFT stage as configured, writing into ``run``."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(resolve_model(cfg.model), device=cfg.device)
    train, held = load_sft_rows(cfg, ChatEncoder(tokenizer, cfg.data.max_length))
    learner = build_learner(cfg, model, temperature=1.0)
    pad_id = tokenizer.pad_token_id
    before = (
        asyncio.run(evaluate_model(cfg, model, tokenizer, run, step=0)) if cfg.eval.before else None
    )
    metrics = {"eval/loss_before": heldout_nll(learner, held, pad_id)} if held else {}
    batches = batch_indices(len(train), cfg.data.batch_size, cfg.seed)
    steps = cfg.trainer.steps
    step = 0
    try:
        for step in tqdm(
            range(1, steps + 1), desc="sft", disable=not cfg.run.progress, file=sys.stderr
        ):
            started = time.perf_counter()
            rows = [train[i] for i in next(batches)]
            batch = token_batch(rows, pad_id)
            step_metrics = learner.step(batch, _loss)
            step_metrics |= {
                "tokens": float(batch.num_loss_tokens),
                "truncated": float(sum(r.truncated for r in rows)),
            }
            end_step(cfg, run, model, tokenizer, step, step_metrics, started)
    except BaseException:
        save_interrupted(model, tokenizer, run, step)
        raise
    if held:
        metrics["eval/loss_after"] = heldout_nll(learner, held, pad_id)
        run.log(
            steps,
            {"loss_before": metrics["eval/loss_before"], "loss": metrics["eval/loss_after"]},
            kind="eval",
        )
    after = (
        asyncio.run(evaluate_model(cfg, model, tokenizer, run, step=steps))
        if cfg.eval.after
        else None
    )
    final = save_checkpoint(model, tokenizer, run.checkpoints / "final")
    return StageResult("sft", str(final), before=before, after=after, metrics=metrics)


def load_sft_rows(cfg: TrainConfig, encoder: ChatEncoder) -> tuple[list[Encoded], list[Encoded]]:
    """Train and held-out rows of ``data.path`` (held out: ``data.eval_path``, else
    ``data.eval_size`` rows); prints how many were cut to ``data.max_length``."""
    examples = read_sft(cfg.data.path)  # type: ignore[arg-type]
    if cfg.data.eval_path is not None:
        train, held = examples, read_sft(cfg.data.eval_path)
    elif cfg.data.eval_size:
        train, held = held_out(examples, cfg.data.eval_size, cfg.seed, cfg.data.path)
    else:
        train, held = examples, []
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
        logprobs_BT = learner.score(learner.model, batch)
        total -= float((logprobs_BT * batch.loss_mask_BT).sum())
        count += float(batch.loss_mask_BT.sum())
    return total / max(count, 1.0)


def _loss(batch, logprobs_BT, *, num_tokens: float, num_seqs: float):
    return sft_loss(logprobs_BT, batch.loss_mask_BT, num_tokens=num_tokens)
