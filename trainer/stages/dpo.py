"""DPO stage: the preference family on a dataset of answers to the same prompts.

``dpo.loss`` picks the loss (``trainer.losses``): ``sigmoid`` (DPO; cDPO with
``label_smoothing``), ``ipo``, ``kto`` (answers labelled desirable or not), ``simpo`` and
``orpo`` (both reference-free). One stage, top to bottom:

1. **reference**: for the losses that need one, the starting model scores every answer of
   the train and held-out sets ONCE, before training; the per-token log-probs are kept in
   memory and saved to ``reference_logprobs.pt`` in the run directory, and the reference
   model is then dropped. SimPO and ORPO load no reference.
2. **step**: ``data.batch_size`` pairs as interleaved rows (chosen, rejected, chosen, ...;
   micro-batches hold whole pairs), each answer's log-prob summed over its own tokens
   (the prompt is masked), the loss, one AdamW step. KTO steps take answers instead, and
   first estimate ``KL(policy || reference)`` on mismatched prompt/answer rows (each answer
   after the next example's prompt), without grad, as its reference point.
3. **log / checkpoint**.

Before and after training, on held-out pairs: how often the model finds the chosen
answer more likely than the rejected one (``eval/pref_accuracy``), the mean log-prob
margin (``eval/margin``), and for the losses with a reference how often the implicit
reward ``beta * (log-ratio chosen - log-ratio rejected)`` is positive
(``eval/reward_accuracy``, 0 before training, where every log-ratio is 0); plus the env's
held-out accuracy if enabled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from palaestra.config import TrainConfig
from palaestra.models import load_model, resolve_model
from palaestra.rundir import RunDir
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.data import (
    ChatEncoder,
    Encoded,
    LabelledAnswer,
    PreferencePair,
    batch_indices,
    held_out,
    labelled,
    pairs_only,
    read_preferences,
    token_batch,
)
from palaestra.trainer.learner import Learner
from palaestra.trainer.losses import REFERENCE_FREE, kto_loss, preference_loss
from palaestra.trainer.stages.common import (
    StageResult,
    build_learner,
    end_step,
    evaluate_model,
    frozen_copy,
    save_interrupted,
)


@dataclasses.dataclass
class _Rows:
    """Tokenised answers with their cached reference log-probs (None: reference-free)."""

    rows: list[Encoded]
    ref: list[torch.Tensor] | None = None

    def batch(
        self, indices: Sequence[int], pad_id: int, advantages: Sequence[float] = ()
    ) -> TokenBatch:
        batch = token_batch([self.rows[i] for i in indices], pad_id)
        if advantages:
            batch = dataclasses.replace(batch, advantages_B=torch.tensor(advantages))
        if self.ref is None:
            return batch
        ref_BT = torch.zeros(batch.input_ids_BT.shape)
        for b, i in enumerate(indices):
            ref_BT[b, : len(self.ref[i])] = self.ref[i]
        return batch.with_ref_logprobs(ref_BT)


def run_dpo(cfg: TrainConfig, run: RunDir) -> StageResult:
    """Run a DPO-family stage as configured, writing into ``run``."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(resolve_model(cfg.model), device=cfg.device)
    encoder, pad_id = ChatEncoder(tokenizer, cfg.data.max_length), tokenizer.pad_token_id
    train_examples, held_examples = _load(cfg)
    kto = cfg.dpo.loss == "kto"
    # 1. encode; KTO trains on answers (and mismatched rows for its KL), the rest on pairs
    if kto:
        answers = labelled(train_examples)
        mismatched = [answers[(i + 1) % len(answers)].completion for i in range(len(answers))]
        train = _Rows([_encode(encoder, a.prompt, a.completion) for a in answers])
        kl_rows = _Rows(
            [_encode(encoder, a.prompt, m) for a, m in zip(answers, mismatched, strict=True)]
        )
        desirable = [1.0 if a.desirable else -1.0 for a in answers]
    else:
        train = _Rows(_pair_rows(encoder, pairs_only(train_examples, cfg.data.path)))
    held = _Rows(_pair_rows(encoder, [e for e in held_examples if isinstance(e, PreferencePair)]))
    learner = build_learner(cfg, model, temperature=1.0)
    learner.micro_batch_size = max(2, learner.micro_batch_size // 2 * 2)  # whole pairs
    # 2. reference log-probs, once
    if cfg.dpo.loss not in REFERENCE_FREE:
        reference = frozen_copy(model)
        for answers_of in (train, held, *([kl_rows] if kto else [])):
            answers_of.ref = _per_row_logprobs(learner, reference, answers_of.rows, pad_id)
        del reference
        torch.save({"train": train.ref, "held_out": held.ref}, run.root / "reference_logprobs.pt")
    before = (
        asyncio.run(evaluate_model(cfg, model, tokenizer, run, step=0)) if cfg.eval.before else None
    )
    metrics = _held_out_measures(learner, held, pad_id, "before", cfg.dpo.beta)
    per_step = cfg.data.batch_size if kto else cfg.data.batch_size * 2
    batches = batch_indices(len(train.rows) // (1 if kto else 2), cfg.data.batch_size, cfg.seed)
    steps, step = cfg.trainer.steps, 0
    try:
        for step in tqdm(
            range(1, steps + 1), desc=cfg.dpo.loss, disable=not cfg.run.progress, file=sys.stderr
        ):
            started = time.perf_counter()
            picked = next(batches)
            if kto:
                batch = train.batch(picked, pad_id, [desirable[i] for i in picked])
                kl = _kl_estimate(learner, kl_rows, picked, pad_id)
                step_metrics = learner.step(batch, _kto_loss_fn(cfg, kl))
            else:
                pair_rows = [r for i in picked for r in (2 * i, 2 * i + 1)]
                step_metrics = learner.step(train.batch(pair_rows, pad_id), _pair_loss_fn(cfg))
            step_metrics["answers"] = float(per_step)
            end_step(cfg, run, model, tokenizer, step, step_metrics, started)
    except BaseException:
        save_interrupted(model, tokenizer, run, step)
        raise
    metrics |= _held_out_measures(learner, held, pad_id, "after", cfg.dpo.beta)
    if held.rows:
        run.log(steps, {k.removeprefix("eval/"): v for k, v in metrics.items()}, kind="eval")
    after = (
        asyncio.run(evaluate_model(cfg, model, tokenizer, run, step=steps))
        if cfg.eval.after
        else None
    )
    final = save_checkpoint(model, tokenizer, run.checkpoints / "final")
    return StageResult("dpo", str(final), before=before, after=after, metrics=metrics)


def _load(
    cfg: TrainConfig,
) -> tuple[list[PreferencePair | LabelledAnswer], list[PreferencePair | LabelledAnswer]]:
    examples = read_preferences(cfg.data.path)  # type: ignore[arg-type]
    if cfg.data.eval_path is not None:
        return examples, read_preferences(cfg.data.eval_path)
    if cfg.data.eval_size:
        return held_out(examples, cfg.data.eval_size, cfg.seed, cfg.data.path)
    return examples, []


def _encode(encoder: ChatEncoder, prompt: list, answer: list) -> Encoded:
    return encoder.encode([*prompt, *answer], train_from=len(prompt))


def _pair_rows(encoder: ChatEncoder, pairs: Sequence[PreferencePair]) -> list[Encoded]:
    """Rows chosen0, rejected0, chosen1, ...: each answer after its prompt."""
    return [_encode(encoder, p.prompt, answer) for p in pairs for answer in (p.chosen, p.rejected)]


def _per_row_logprobs(
    learner: Learner, model, rows: list[Encoded], pad_id: int
) -> list[torch.Tensor]:
    """Each row's per-token log-probs under ``model`` (0 off the answer), trimmed to its length."""
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        logprobs_BT = learner.score(model, token_batch(chunk, pad_id))
        out += [logprobs_BT[b, : len(r.ids)].clone() for b, r in enumerate(chunk)]
    return out


def _sums(batch: TokenBatch, logprobs_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed answer log-prob and answer length."""
    return (logprobs_BT * batch.loss_mask_BT).sum(dim=1), batch.loss_mask_BT.sum(dim=1)


def pair_loss(
    cfg: TrainConfig,
    sums_B: torch.Tensor,
    lengths_B: torch.Tensor,
    ref_sums_B: torch.Tensor | None,
    num_pairs: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``dpo.loss`` on answers laid out chosen, rejected, chosen, ...: their summed
    log-probs, token counts and (with a reference) the reference's sums."""
    d = cfg.dpo
    return preference_loss(
        sums_B[0::2],
        sums_B[1::2],
        loss=d.loss,  # type: ignore[arg-type]
        beta=d.beta,
        ref_chosen_logps_P=None if ref_sums_B is None else ref_sums_B[0::2],
        ref_rejected_logps_P=None if ref_sums_B is None else ref_sums_B[1::2],
        chosen_lengths_P=lengths_B[0::2],
        rejected_lengths_P=lengths_B[1::2],
        label_smoothing=d.label_smoothing,
        simpo_gamma=d.simpo_gamma,
        num_pairs=num_pairs,
    )


def _pair_loss_fn(cfg: TrainConfig):
    def loss(batch: TokenBatch, logprobs_BT: torch.Tensor, *, num_tokens: float, num_seqs: float):
        sums_B, lengths_B = _sums(batch, logprobs_BT)
        ref_B = (
            _sums(batch, batch.ref_logprobs_BT)[0] if batch.ref_logprobs_BT is not None else None
        )
        return pair_loss(cfg, sums_B, lengths_B, ref_B, num_seqs / 2)

    return loss


def _kto_loss_fn(cfg: TrainConfig, kl: float):
    """KTO over answer rows; a row's advantage field carries its label (+1 desirable)."""
    d = cfg.dpo

    def loss(batch: TokenBatch, logprobs_BT: torch.Tensor, *, num_tokens: float, num_seqs: float):
        assert batch.ref_logprobs_BT is not None  # KTO always has a reference
        return kto_loss(
            _sums(batch, logprobs_BT)[0],
            _sums(batch, batch.ref_logprobs_BT)[0],
            batch.advantages_B > 0,
            kl=kl,
            beta=d.beta,
            desirable_weight=d.desirable_weight,
            undesirable_weight=d.undesirable_weight,
            num_examples=num_seqs,
        )

    return loss


def _kl_estimate(learner: Learner, kl_rows: _Rows, picked: Sequence[int], pad_id: int) -> float:
    """KTO's reference point: the mean log-ratio policy / reference of the step's answers
    placed after mismatched prompts, without grad."""
    batch = kl_rows.batch(picked, pad_id)
    policy_B = _sums(batch, learner.score(learner.model, batch))[0]
    assert batch.ref_logprobs_BT is not None
    return float((policy_B - _sums(batch, batch.ref_logprobs_BT)[0]).mean())


def _held_out_measures(
    learner: Learner, held: _Rows, pad_id: int, when: str, beta: float
) -> dict[str, float]:
    """How often the model finds the chosen answer more likely, the mean log-prob margin,
    and (with a reference) how often DPO's implicit reward ranks the pair right."""
    if not held.rows:
        return {}
    sums = torch.cat(
        [
            _sums(
                batch := token_batch(held.rows[s : s + 16], pad_id),
                learner.score(learner.model, batch),
            )[0]
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
