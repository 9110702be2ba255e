"""DPO stage: the preference family on a dataset of answers to the same prompts.

``dpo.loss`` picks the loss (``trainer.losses``): ``sigmoid`` (DPO; cDPO with
``label_smoothing``), ``ipo``, ``kto`` (answers labelled desirable or not), ``simpo`` and
``orpo`` (both reference-free). The dataset loop (``stages.dataset``) runs it; what is
the family's own, top to bottom:

1. **reference**: for the losses that need one, the starting model scores every answer of
   the train and held-out sets ONCE, before training; the per-token log-probs are kept in
   memory and saved to ``reference_logprobs.pt`` in the run directory, and the reference
   model is then dropped. SimPO and ORPO load no reference.
2. **step**: ``data.batch_size`` pairs as interleaved rows (chosen, rejected, chosen, ...;
   micro-batches hold whole pairs), each answer's log-prob summed over its own tokens
   (the prompt is masked), the loss (``trainer.preference.pair_loss``), one AdamW step.
   KTO steps take answers instead (``labels_B``: 1 desirable, 0 undesirable), and first
   estimate ``KL(policy || reference)`` on mismatched prompt/answer rows (each answer
   after the next example's prompt), without grad, as its reference point.

Before and after training, on held-out pairs: how often the model finds the chosen
answer more likely than the rejected one (``eval/pref_accuracy``), the mean log-prob
margin (``eval/margin``), and for the losses with a reference how often the implicit
reward ``beta * (log-ratio chosen - log-ratio rejected)`` is positive
(``eval/reward_accuracy``, 0 before training, where every log-ratio is 0); plus the env's
held-out accuracy if enabled.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from palaestra.rundir import RunDir
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.data import (
    ChatEncoder,
    Encoded,
    LabelledAnswer,
    PreferencePair,
    labelled,
    pairs_only,
    read_preferences,
    split_dataset,
    token_batch,
)
from palaestra.trainer.learner import Learner, LossFn
from palaestra.trainer.losses import kto_loss
from palaestra.trainer.preference import needs_reference, pair_loss
from palaestra.trainer.stages.common import (
    StageResult,
    load_policy,
    policy_learner,
    reference_policy,
)
from palaestra.trainer.stages.dataset import DatasetStep, DatasetTask, run_dataset_stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from palaestra.config import DPOConfig, DPOStage


@dataclasses.dataclass(frozen=True)
class _Answers:
    """Tokenised answers, each after its prompt, and what a batch of them carries."""

    rows: list[Encoded]
    """One row per answer (pairs: chosen, rejected, chosen, ...)."""
    ref: list[torch.Tensor] | None = None
    """Each row's per-token reference log-probs (None: a reference-free loss)."""
    labels: list[bool] | None = None
    """KTO: whether each answer is desirable."""

    def batch(self, indices: Sequence[int], pad_id: int) -> TokenBatch:
        batch = token_batch([self.rows[i] for i in indices], pad_id)
        if self.labels is not None:
            labels_B = torch.tensor([float(self.labels[i]) for i in indices])
            batch = dataclasses.replace(batch, labels_B=labels_B)
        if self.ref is None:
            return batch
        ref_BT = torch.zeros(batch.input_ids_BT.shape)
        for b, i in enumerate(indices):
            ref_BT[b, : len(self.ref[i])] = self.ref[i]
        return batch.with_ref_logprobs(ref_BT)


def run_dpo(cfg: DPOStage, run: RunDir) -> StageResult:
    """Run a DPO-family stage as configured, writing into ``run``."""
    return run_dataset_stage(cfg, run, dpo_task)


def dpo_task(cfg: DPOStage, run: RunDir) -> DatasetTask:
    """Load the model and the answers, score the reference once; the family's steps."""
    model, tokenizer = load_policy(cfg, cfg.lora)
    encoder, pad_id = ChatEncoder(tokenizer, cfg.data.max_length), tokenizer.pad_token_id
    train_examples, held_examples = split_dataset(cfg.data, cfg.seed, read_preferences)
    kto = cfg.dpo.loss == "kto"
    # KTO trains on answers (and mismatched rows for its KL), the other losses on pairs
    if kto:
        train, kl_rows = _kto_answers(encoder, labelled(train_examples))
    else:
        train = _Answers(_pair_rows(encoder, pairs_only(train_examples, cfg.data.path)))
        kl_rows = _Answers([])  # only KTO has KL rows
    held_pairs = [e for e in held_examples if isinstance(e, PreferencePair)]
    held = _Answers(_pair_rows(encoder, held_pairs))
    learner = policy_learner(cfg, model, temperature=1.0)
    if needs_reference(cfg.dpo.loss):
        train, held, kl_rows = _with_reference(learner, model, pad_id, train, held, kl_rows)
        torch.save({"train": train.ref, "held_out": held.ref}, run.root / "reference_logprobs.pt")
    measures = functools.partial(_held_out_measures, learner, held, pad_id, cfg.dpo.beta)
    if kto:
        step = _kto_step(cfg.dpo, learner, train, kl_rows, pad_id)
        return DatasetTask("dpo", learner, tokenizer, len(train.rows), step, measures)
    return DatasetTask(
        "dpo",
        learner,
        tokenizer,
        len(train.rows) // 2,
        _pair_step(cfg.dpo, train, pad_id),
        measures,
        micro_batch_size=max(2, cfg.trainer.micro_batch_size // 2 * 2),  # whole pairs
    )


def _encode(encoder: ChatEncoder, prompt: list, answer: list) -> Encoded:
    return encoder.encode([*prompt, *answer], train_from=len(prompt))


def _pair_rows(encoder: ChatEncoder, pairs: Sequence[PreferencePair]) -> list[Encoded]:
    """Rows chosen0, rejected0, chosen1, ...: each answer after its prompt."""
    return [_encode(encoder, p.prompt, answer) for p in pairs for answer in (p.chosen, p.rejected)]


def _kto_answers(
    encoder: ChatEncoder, answers: Sequence[LabelledAnswer]
) -> tuple[_Answers, _Answers]:
    """KTO's labelled answers, and each answer after the NEXT answer's prompt (its KL rows)."""
    train = _Answers(
        [_encode(encoder, a.prompt, a.completion) for a in answers],
        labels=[a.desirable for a in answers],
    )
    mismatched = [answers[(i + 1) % len(answers)].completion for i in range(len(answers))]
    kl_rows = [_encode(encoder, a.prompt, m) for a, m in zip(answers, mismatched, strict=True)]
    return train, _Answers(kl_rows)


def _with_reference(
    learner: Learner, model: PreTrainedModel, pad_id: int, *sets: _Answers
) -> list[_Answers]:
    """``sets`` with the starting ``model``'s per-token log-probs of every row, scored once
    by its reference (``common.reference_policy``), which is dropped afterwards."""
    reference = reference_policy(model)
    out = []
    for answers in sets:
        ref: list[torch.Tensor] = []
        for start in range(0, len(answers.rows), 16):
            chunk = answers.rows[start : start + 16]
            logprobs_BT = learner.score(token_batch(chunk, pad_id), model=reference)
            ref += [logprobs_BT[b, : len(r.ids)].clone() for b, r in enumerate(chunk)]
        out.append(dataclasses.replace(answers, ref=ref))
    return out


def _pair_step(
    settings: DPOConfig, train: _Answers, pad_id: int
) -> Callable[[Sequence[int]], DatasetStep]:
    """A step over pairs: both answers of each picked pair, interleaved."""

    def loss(
        batch: TokenBatch, outputs: torch.Tensor, *, num_tokens: float, num_seqs: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        sums_B, lengths_B = _sums(batch, outputs)  # outputs: the policy's token log-probs
        ref_B = None if batch.ref_logprobs_BT is None else _sums(batch, batch.ref_logprobs_BT)[0]
        return pair_loss(settings, sums_B, lengths_B, ref_B, num_seqs / 2)

    def step(picked: Sequence[int]) -> DatasetStep:
        rows = [r for i in picked for r in (2 * i, 2 * i + 1)]
        return DatasetStep(train.batch(rows, pad_id), loss, {"answers": float(len(rows))})

    return step


def _kto_step(
    settings: DPOConfig, learner: Learner, train: _Answers, kl_rows: _Answers, pad_id: int
) -> Callable[[Sequence[int]], DatasetStep]:
    """A KTO step over the picked answers, its reference point estimated first."""

    def step(picked: Sequence[int]) -> DatasetStep:
        batch = train.batch(picked, pad_id)
        kl = _kl_estimate(learner, kl_rows.batch(picked, pad_id))
        return DatasetStep(batch, _kto_loss_fn(settings, kl), {"answers": float(len(picked))})

    return step


def _kto_loss_fn(settings: DPOConfig, kl: float) -> LossFn:
    def loss(
        batch: TokenBatch, outputs: torch.Tensor, *, num_tokens: float, num_seqs: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.ref_logprobs_BT is None or batch.labels_B is None:
            raise ValueError("a KTO batch carries reference log-probs and labels")
        return kto_loss(
            _sums(batch, outputs)[0],
            _sums(batch, batch.ref_logprobs_BT)[0],
            batch.labels_B > 0,
            kl=kl,
            beta=settings.beta,
            desirable_weight=settings.desirable_weight,
            undesirable_weight=settings.undesirable_weight,
            num_examples=num_seqs,
        )

    return loss


def _sums(batch: TokenBatch, logprobs_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed answer log-prob and answer length."""
    return (logprobs_BT * batch.loss_mask_BT).sum(dim=1), batch.loss_mask_BT.sum(dim=1)


def _kl_estimate(learner: Learner, kl_batch: TokenBatch) -> float:
    """KTO's reference point: the mean log-ratio policy / reference of the step's answers
    placed after mismatched prompts, without grad."""
    if kl_batch.ref_logprobs_BT is None:
        raise ValueError("KTO's mismatched rows carry reference log-probs")
    policy_B = _sums(kl_batch, learner.score(kl_batch))[0]
    return float((policy_B - _sums(kl_batch, kl_batch.ref_logprobs_BT)[0]).mean())


def _held_out_measures(
    learner: Learner, held: _Answers, pad_id: int, beta: float, when: str
) -> dict[str, float]:
    """How often the model finds the chosen answer more likely, the mean log-prob margin,
    and (with a reference) how often DPO's implicit reward ranks the pair right."""
    if not held.rows:
        return {}
    sums = torch.cat(
        [
            _sums(batch := token_batch(held.rows[s : s + 16], pad_id), learner.score(batch))[0]
            for s in range(0, len(held.rows), 16)
        ]
    )
    margin = sums[0::2] - sums[1::2]
    measures = {
        f"eval/pref_accuracy_{when}": float((margin > 0).float().mean()),
        f"eval/margin_{when}": float(margin.mean()),
    }
    if held.ref is not None:
        ref = torch.stack([r.sum() for r in held.ref])
        implicit = beta * (margin - (ref[0::2] - ref[1::2]))
        measures[f"eval/reward_accuracy_{when}"] = float((implicit > 0).float().mean())
    return measures
