"""Reward-model stage: a Bradley-Terry reward model trained on preference pairs.

The model is the starting causal LM's body with a fresh scalar head
(``AutoModelForSequenceClassification``, one label), read at the conversation's last token
(``agent.learned_reward.last_token_scores``). The dataset loop (``stages.dataset``) runs
it on the one ``Learner``; what is the reward model's own, top to bottom:

1. **batch**: ``data.batch_size`` pairs from ``data.path`` (``{"prompt", "chosen",
   "rejected"}``), each answer after its prompt, the whole conversation rendered with the
   chat template (``agent.learned_reward.encode_conversations``, as scoring renders it);
   rows interleaved chosen, rejected, ... and micro-batches of ``trainer.micro_batch_size``
   PAIRS, so a pair is never split.
2. **loss**: ``-log sigmoid(r_chosen - r_rejected)`` (``losses.bradley_terry_loss``) over
   the step's pairs; loss, accuracy and margin are means over pairs. Being the one
   learner's step, it honours ``trainer.warmup_steps`` and
   ``trainer.gradient_checkpointing``, which this stage's own optimiser loop used to
   ignore, beside clipping, AdamW and the resolved precision.
3. **checkpoint**: ``checkpoints/final`` loads with
   ``AutoModelForSequenceClassification.from_pretrained`` and serves as a learned reward
   in any env with ``env.reward_model.path`` (read ``agent.learned_reward`` on reward
   hacking first).

Before and after: the held-out pair accuracy (``eval/rm_accuracy``) and mean margin
(``eval/rm_margin``). A reward model generates no text, so the env never evaluates it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from palaestra.agent.learned_reward import encode_conversations, last_token_scores
from palaestra.models import load_tokenizer, resolve_model
from palaestra.rundir import RunDir
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.data import PreferencePair, pairs_only, read_preferences, split_dataset
from palaestra.trainer.learner import Learner, OptimSettings
from palaestra.trainer.losses import bradley_terry_loss
from palaestra.trainer.stages.common import StageResult
from palaestra.trainer.stages.dataset import DatasetStep, DatasetTask, run_dataset_stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from palaestra.config import RewardModelStage


def run_reward_model(cfg: RewardModelStage, run: RunDir) -> StageResult:
    """Train a Bradley-Terry reward model as configured, writing into ``run``."""
    return run_dataset_stage(cfg, run, reward_model_task)


def reward_model_task(cfg: RewardModelStage, run: RunDir) -> DatasetTask:
    """Load the model with a fresh head and the pairs; the reward model's steps."""
    model, tokenizer = _load_reward_model(cfg)
    train, held = split_dataset(cfg.data, cfg.seed, _read_pairs)
    learner = Learner(
        model,
        OptimSettings.of(cfg.trainer),
        forward=_scores,
        precision=cfg.precision(),
    )
    max_length = cfg.data.max_length

    def step(picked: Sequence[int]) -> DatasetStep:
        return DatasetStep(_pair_batch(tokenizer, [train[i] for i in picked], max_length), _loss)

    return DatasetTask(
        "reward_model",
        learner,
        tokenizer,
        len(train),
        step,
        functools.partial(_held_out_measures, learner, tokenizer, held, max_length),
        micro_batch_size=2 * cfg.trainer.micro_batch_size,  # pairs, two rows each
        generates=False,
    )


def _load_reward_model(cfg: RewardModelStage) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting model's body with a fresh scalar head (float32; the learner autocasts)."""
    from transformers import AutoModelForSequenceClassification

    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(cfg.device), tokenizer


def _read_pairs(path: Path) -> list[PreferencePair]:
    """The preference pairs of ``path``; ``DataError`` if it holds unpaired answers."""
    return pairs_only(read_preferences(path), path)


def _pair_batch(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair], max_length: int
) -> TokenBatch:
    """Rows chosen0, rejected0, chosen1, ...: each whole conversation, every token real."""
    conversations = [[*p.prompt, *answer] for p in pairs for answer in (p.chosen, p.rejected)]
    ids_BT, mask_BT = encode_conversations(tokenizer, conversations, max_length)
    return TokenBatch(ids_BT, mask_BT, mask_BT.float())


def _scores(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """The learner's forward: one score per row, read at its last token, shape ``(B,)``."""
    return last_token_scores(model, batch.input_ids_BT, batch.attention_mask_BT)


def _loss(
    batch: TokenBatch, outputs: torch.Tensor, *, num_tokens: float, num_seqs: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry over the micro-batch's pairs; ``outputs`` are ``_scores``, one a row."""
    return bradley_terry_loss(outputs[0::2], outputs[1::2], num_pairs=num_seqs / 2)


def _held_out_measures(
    learner: Learner,
    tokenizer: PreTrainedTokenizerBase,
    held: list[PreferencePair],
    max_length: int,
    when: str,
) -> dict[str, float]:
    """Held-out pair accuracy (chosen scored above rejected) and mean margin, scored in
    float32 without autocast, as ``RewardModelScorer`` serves the model."""
    if not held:
        return {}
    model = learner.model.eval()
    with torch.no_grad():
        scores = torch.cat(
            [
                _scores(
                    model, _pair_batch(tokenizer, held[s : s + 16], max_length).to(learner.device)
                )
                for s in range(0, len(held), 16)
            ]
        )
    margin = scores[0::2] - scores[1::2]
    return {
        f"eval/rm_accuracy_{when}": float((margin > 0).float().mean()),
        f"eval/rm_margin_{when}": float(margin.mean()),
    }
