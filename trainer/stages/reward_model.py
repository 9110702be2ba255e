"""Reward-model stage: a Bradley-Terry reward model trained on preference pairs.

The model is the starting causal LM's body with a fresh scalar head
(``AutoModelForSequenceClassification``, one label), read at the conversation's last token
(``agent.learned_reward.last_token_scores``). One step, top to bottom:

1. **batch**: ``data.batch_size`` pairs from ``data.path`` (``{"prompt", "chosen",
   "rejected"}``), each answer scored after its prompt, the whole conversation rendered
   with the chat template.
2. **loss**: ``-log sigmoid(r_chosen - r_rejected)`` (``losses.bradley_terry_loss``),
   micro-batched, gradient clipping, AdamW at ``trainer.lr``.
3. **log / checkpoint**: ``checkpoints/final`` loads with
   ``AutoModelForSequenceClassification.from_pretrained`` and serves as a learned reward
   in any env with ``env.reward_model.path`` (read ``agent.learned_reward`` on reward
   hacking first).

Before and after: the held-out pair accuracy (``eval/rm_accuracy``) and mean margin.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from palaestra.agent.learned_reward import encode_conversations, last_token_scores
from palaestra.config import TrainConfig
from palaestra.envs.core import Messages
from palaestra.models import load_tokenizer, resolve_dtype, resolve_model
from palaestra.rundir import RunDir
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.data import (
    PreferencePair,
    batch_indices,
    held_out,
    pairs_only,
    read_preferences,
)
from palaestra.trainer.losses import bradley_terry_loss
from palaestra.trainer.stages.common import StageResult, peak_rss_gb, save_interrupted


def run_reward_model(cfg: TrainConfig, run: RunDir) -> StageResult:
    """Train a Bradley-Terry reward model as configured, writing into ``run``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(cfg.seed)
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(cfg.device)
    pairs = pairs_only(read_preferences(cfg.data.path), cfg.data.path)  # type: ignore[arg-type]
    if cfg.data.eval_path is not None:
        train, held = pairs, pairs_only(read_preferences(cfg.data.eval_path), cfg.data.eval_path)
    elif cfg.data.eval_size:
        train, held = held_out(pairs, cfg.data.eval_size, cfg.seed, cfg.data.path)
    else:
        train, held = pairs, []
    t = cfg.trainer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay
    )
    autocast = torch.autocast(
        cfg.device.split(":")[0],
        dtype=torch.bfloat16,
        enabled=resolve_dtype(t.dtype, cfg.device) == "bfloat16",
    )
    metrics = _accuracy(model, tokenizer, held, cfg, "before")
    batches = batch_indices(len(train), cfg.data.batch_size, cfg.seed)
    step = 0
    try:
        for step in tqdm(
            range(1, t.steps + 1),
            desc="reward model",
            disable=not cfg.run.progress,
            file=sys.stderr,
        ):
            started = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            batch = [train[i] for i in next(batches)]
            totals: dict[str, float] = {}
            for start in range(0, len(batch), t.micro_batch_size):
                micro = batch[start : start + t.micro_batch_size]
                with autocast:
                    chosen_P, rejected_P = _scores(model, tokenizer, micro, cfg)
                loss, m = bradley_terry_loss(chosen_P, rejected_P, num_pairs=len(batch))
                loss.backward()
                for name, value in m.items():
                    totals[name] = totals.get(name, 0.0) + value * len(micro) / len(batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            totals |= {
                "grad_norm": float(grad_norm),
                "time/step_s": time.perf_counter() - started,
                "memory/peak_rss_gb": peak_rss_gb(),
            }
            run.log(step, totals)
    except BaseException:
        save_interrupted(model, tokenizer, run, step)
        raise
    metrics |= _accuracy(model, tokenizer, held, cfg, "after")
    if held:
        run.log(t.steps, {k.removeprefix("eval/"): v for k, v in metrics.items()}, kind="eval")
    final = save_checkpoint(model, tokenizer, run.checkpoints / "final")
    return StageResult("reward_model", str(final), metrics=metrics)


def _scores(
    model, tokenizer, pairs: list[PreferencePair], cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and of the rejected conversations, shape ``(P,)`` each."""
    conversations: list[Messages] = [
        [*p.prompt, *answer] for p in pairs for answer in (p.chosen, p.rejected)
    ]
    ids_BT, mask_BT = encode_conversations(tokenizer, conversations, cfg.data.max_length)
    scores_B = last_token_scores(model, ids_BT.to(cfg.device), mask_BT.to(cfg.device))
    return scores_B[0::2], scores_B[1::2]


def _accuracy(
    model, tokenizer, pairs: list[PreferencePair], cfg: TrainConfig, when: str
) -> dict[str, float]:
    """Held-out pair accuracy (chosen scored above rejected) and mean margin."""
    if not pairs:
        return {}
    model.eval()
    with torch.no_grad():
        parts = [
            _scores(model, tokenizer, pairs[s : s + 16], cfg) for s in range(0, len(pairs), 16)
        ]
    margin = torch.cat([c - r for c, r in parts])
    return {
        f"eval/rm_accuracy_{when}": float((margin > 0).float().mean()),
        f"eval/rm_margin_{when}": float(margin.mean()),
    }
