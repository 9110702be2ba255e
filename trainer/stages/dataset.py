"""The loop of every stage that trains on a dataset: SFT, the DPO family, the reward model.

What differs between those stages (the model, how examples become a ``TokenBatch``, the
loss, the held-out measures) is a ``DatasetTask`` the stage builds; the rest is this loop,
once, top to bottom:

1. **seed**, then **build** the task: load the model, read and split the data, score a
   reference (the stage's own ``build`` function).
2. **before**: the env's held-out evaluation (``eval.before``, for a model that
   generates; sampled by the stage's ``engine``: a transformers engine on a copy of the
   weights, or a vLLM engine started for it and given the weights, closed again before
   training) and the task's held-out measures.
3. **steps**: ``trainer.steps`` times, ``data.batch_size`` example indices
   (``data.batch_indices``: seeded, reshuffled each pass), the task's batch and loss,
   ``learner.step``, the step's metrics logged and, every ``run.save_every`` steps and on
   Ctrl-C, a training-state checkpoint (``trainer.train_state``: weights, optimizer,
   schedule, random states, the data position); on any other failure the weights trained
   so far are kept as ``checkpoints/interrupted``.
4. **after**: the held-out measures (logged as one ``eval`` record), the env's
   evaluation (``eval.after``, of the trained weights, as in 2), the final checkpoint.

Resuming (a reopened run dir): the task is built as before (a DPO reference scores the
starting weights), the held-out measures before training are taken again from the
starting weights, the env's evaluation before training is read back, then the weights,
optimizer and random states are restored and the steps continue after the saved one on
the same batches an uninterrupted run would draw.

What this module does not do: rollouts (the on-policy loop) or anything one stage alone
needs; a stage that needs more than ``DatasetTask`` offers is not a dataset stage. No
engine runs while it trains: each evaluation starts its own (a vLLM one takes its start-up
time, ~20 s on CPU, at each of ``before`` and ``after``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

import torch

from palaestra.rundir import RunDir
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.data import batch_indices
from palaestra.trainer.learner import Learner, LossFn
from palaestra.trainer.stages.common import (
    StageResult,
    StopOnCtrlC,
    eval_from_record,
    eval_record,
    evaluate_model,
    log_step,
    resumed_state,
    save_interrupted,
    save_training_state,
    state_due,
    step_bar,
)
from palaestra.trainer.stages.nonfinite import NonFiniteWatch
from palaestra.trainer.train_state import (
    SavedState,
    Trained,
    TrainingInterrupted,
    kill_point,
    restore,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from palaestra.agent.evaluate import EvalResult
    from palaestra.config import DatasetStageConfig

Config = TypeVar("Config", bound="DatasetStageConfig")


@dataclass(frozen=True)
class DatasetStep:
    """What one optimizer step trains on."""

    batch: TokenBatch
    """The step's rows."""
    loss_fn: LossFn
    """The loss over a micro-batch of ``batch`` (``Learner.step``'s ``loss_fn``)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Logged beside the learner's metrics (e.g. the step's trained tokens)."""


@dataclass(frozen=True)
class DatasetTask:
    """What a dataset stage plugs into the loop."""

    name: str
    """The stage's name (``StageResult.stage``, the progress bar's label)."""
    learner: Learner
    """The learner over the model this stage trains."""
    tokenizer: PreTrainedTokenizerBase
    """Saved beside the weights in every checkpoint."""
    num_examples: int
    """How many training examples a step's indices are drawn from (a pair is one)."""
    step: Callable[[Sequence[int]], DatasetStep]
    """The batch, loss and extra metrics of a step over these example indices."""
    held_out_measures: Callable[[str], dict[str, float]]
    """``eval/<measure>_<when>`` on the held-out examples, for ``when`` ``before`` or
    ``after`` training; ``{}`` without held-out examples."""
    micro_batch_size: int | None = None
    """Rows per micro-batch where rows must stay together (a pair's two answers); None:
    ``trainer.micro_batch_size``."""
    generates: bool = True
    """Whether the model samples text, so the env can evaluate it (a reward model does not)."""

    @property
    def model(self) -> PreTrainedModel:
        """The learner's model: a Hugging Face model, saved with ``tokenizer``."""
        return cast("PreTrainedModel", self.learner.model)


def run_dataset_stage(
    cfg: Config, run: RunDir, build: Callable[[Config, RunDir], DatasetTask]
) -> StageResult:
    """Seed, ``build`` the stage's task and run it as the module docstring says; a reopened
    ``run`` continues from its training state (``common.resumed_state``)."""
    torch.manual_seed(cfg.seed)
    task = build(cfg, run)
    saved = resumed_state(cfg, run)
    if saved is None:
        before = _evaluate_on_env(cfg, task, run, step=0) if cfg.eval.before else None
    else:
        before = eval_from_record(saved.progress["before"])
    measures = task.held_out_measures("before")  # of the starting weights, resumed or not
    if saved is not None:
        restore(saved, _trained(task))
        print(f"[{task.name}] resumed after step {saved.step} from {saved.path}", file=sys.stderr)
    _train(cfg, run, task, saved, before)
    measures |= task.held_out_measures("after")
    steps = cfg.trainer.steps
    if measures:
        run.log(steps, {k.removeprefix("eval/"): v for k, v in measures.items()}, kind="eval")
    after = _evaluate_on_env(cfg, task, run, step=steps) if cfg.eval.after else None
    final = save_checkpoint(task.model, task.tokenizer, run.checkpoints / "final")
    return StageResult(task.name, str(final), before=before, after=after, metrics=measures)


def _train(
    cfg: DatasetStageConfig,
    run: RunDir,
    task: DatasetTask,
    saved: SavedState | None,
    before: EvalResult | None,
) -> None:
    """The optimizer steps after ``saved``'s (or all ``trainer.steps``); saves the training
    state every ``run.save_every`` steps and on Ctrl-C, and keeps the weights if one fails."""
    first = 1 if saved is None else saved.step + 1
    batches = batch_indices(task.num_examples, cfg.data.batch_size, cfg.seed, skip=first - 1)
    step = first - 1
    nonfinite = NonFiniteWatch(cfg.trainer)
    if saved is not None:
        nonfinite.total, nonfinite.in_a_row = saved.progress["nonfinite"]
    bar = step_bar(cfg, task.name, first)
    with StopOnCtrlC() as stop:
        try:
            for step in bar:
                started = time.perf_counter()
                planned = task.step(next(batches))
                metrics = task.learner.step(
                    planned.batch, planned.loss_fn, micro_batch_size=task.micro_batch_size
                )
                kill_point("update", step)
                metrics |= nonfinite.count(step, metrics)
                log_step(run, step, metrics | planned.metrics, started)
                nonfinite.check(step)
                if state_due(cfg, step) or stop.requested:
                    progress = {
                        "before": eval_record(before),
                        "nonfinite": [nonfinite.total, nonfinite.in_a_row],
                    }
                    path = save_training_state(cfg, run, _trained(task), step, progress)
                    if stop.requested:
                        raise TrainingInterrupted(step, path)
        except KeyboardInterrupt:  # ours (state saved), or a second Ctrl-C: quit now
            raise
        except BaseException:
            save_interrupted(task.model, task.tokenizer, run, step)
            raise


def _trained(task: DatasetTask) -> Trained:
    """What a training state of ``task`` holds: the model and its learner."""
    return Trained(task.model, task.tokenizer, {"policy": task.learner}, {})


def _evaluate_on_env(
    cfg: DatasetStageConfig, task: DatasetTask, run: RunDir, *, step: int
) -> EvalResult | None:
    """The env's held-out evaluation of the model at ``step``; None for a reward model."""
    if not task.generates:
        return None
    return asyncio.run(evaluate_model(cfg, task.model, task.tokenizer, run, step=step))
