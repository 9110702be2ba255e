"""The on-policy loop: sample groups from the env, hand them to an update, sync weights.

Every stage that trains on the model's own rollouts (GRPO and its family, PPO with a
critic, online DPO) runs this loop; what differs is its ``PolicyUpdate``, a small object
the stage builds. One step, top to bottom:

1. **collect**: take ``tasks_per_step`` groups of ``group_size`` episodes from the rollout
   producer (``agent.producer``), which samples them concurrently in the background, at
   most ``rollout.max_staleness`` policy versions behind the learner (0: on exactly the
   weights of the previous step). Groups over the bound are dropped and counted.
2. **filter**: drop infrastructure failures (engine or env errors): they say nothing about
   the policy and are counted, never trained as reward 0.
3. **update**: the stage's ``PolicyUpdate`` turns the trajectories into learner steps
   (rewards, advantages, losses). It runs on a worker thread, so the producer keeps
   sampling the next steps meanwhile.
4. **sync**: copy the new weights (with ``lora``, the adapters only) into the engine,
   stamped with the next policy version; every ``verify_every`` steps (and once before
   training), check that the engine scores a sequence as the learner does
   (``trainer.weight_sync``).
5. **log / checkpoint**: rewards, train/inference mismatch, staleness histogram, phase
   times, memory; every ``run.save_every`` steps and on Ctrl-C, a training-state
   checkpoint (``trainer.train_state``: weights, optimizers, random states, the loop's
   counters).

Resuming (a reopened run dir): the policy and the update are built as before (references
copy the starting weights), then the saved state is restored, the engine synced to it as
policy version ``step``, and the producer started at ``step + 1``. A step's tasks are a
function of the seed and the step (``sampling.group_requests``) and each request samples
with its own seed, so with ``max_staleness: 0`` a resumed run trains exactly what an
uninterrupted one would; with ``max_staleness > 0`` the groups sampled ahead of the saved
step are sampled again on the restored weights, so every group is trained exactly once.

Ctrl-C: the first stops the producer at once (rollouts in flight are abandoned); a step
whose update is running finishes it and is logged, unsynced; then the training state of
the last finished step is saved and ``TrainingInterrupted`` raised. A second Ctrl-C quits
without saving.

Evaluation on the env's held-out split runs before and after training. Where a new
algorithm goes: a ``PolicyUpdate`` in its stage module, built from a ``Policy``; this
loop does not change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from palaestra.agent.engines.base import Engine
from palaestra.agent.engines.build import close_engine, engine_metrics
from palaestra.agent.producer import ProducerStats, RolloutProducer
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool
from palaestra.agent.template_audit import audit_for_training
from palaestra.agent.trajectory import Trajectory
from palaestra.config import GRPOConfig, OnPolicyStageConfig
from palaestra.envs.core import Messages
from palaestra.rundir import RunDir
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.errors import AllEpisodesFailedError
from palaestra.trainer.learner import Learner
from palaestra.trainer.stages.common import (
    StageResult,
    StopOnCtrlC,
    eval_from_record,
    eval_record,
    evaluate_on_env,
    load_policy,
    open_engine,
    policy_learner,
    resumed_state,
    return_freed_memory,
    save_interrupted,
    save_training_state,
    state_due,
    step_bar,
    train_env_factory,
)
from palaestra.trainer.stages.health import SignalWatch
from palaestra.trainer.stages.nonfinite import NonFiniteWatch
from palaestra.trainer.stages.sampling import rollout_producer
from palaestra.trainer.stages.step_metrics import producer_metrics, rollout_metrics, step_resources
from palaestra.trainer.train_state import (
    SavedState,
    Trained,
    TrainingInterrupted,
    kill_point,
    restore,
)
from palaestra.trainer.weight_sync import default_tolerance, verify_engine_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from palaestra.agent.evaluate import EvalResult


@dataclass
class Policy:
    """What an on-policy run trains and samples with."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    renderer: ChatRenderer
    learner: Learner
    """The policy's learner (its forward scores at the rollout temperature)."""


class PolicyUpdate(Protocol):
    """Step 3 of the loop: one stage's learning from a step's trajectories."""

    def __call__(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """Learn from the step's trajectories (infrastructure failures already removed);
        returns the step's metrics. Runs on a worker thread."""
        ...

    def finish(self, run: RunDir) -> None:
        """After training: save what the update owns besides the policy (e.g. a critic)."""
        ...

    def learners(self) -> dict[str, Learner]:
        """The learners it trains besides the policy's, by name (PPO's ``critic``): a
        training state saves and restores their weights and optimizer states."""
        ...


BuildUpdate = Callable[[Policy], PolicyUpdate]
"""How a stage makes its update, once the policy is loaded."""


def run_on_policy(
    cfg: OnPolicyStageConfig,
    run: RunDir,
    build_update: BuildUpdate,
    *,
    dynamic_sampling: GRPOConfig,
) -> StageResult:
    """Run the loop of this module as configured, with the stage's update; the ``grpo``
    section's ``dynamic_sampling`` (DAPO's) replaces groups whose rewards are all equal
    (``agent.producer.DynamicSampling``) for ``dynamic_sampling_rounds`` rounds per step."""
    rounds = dynamic_sampling.dynamic_sampling_rounds if dynamic_sampling.dynamic_sampling else 0
    torch.manual_seed(cfg.seed)

    async def main() -> StageResult:
        model, tokenizer = load_policy(cfg, cfg.lora)
        engine = open_engine(cfg, model, tokenizer)
        policy = Policy(
            model, tokenizer, engine, ChatRenderer(tokenizer), policy_learner(cfg, model)
        )
        pool = EnvPool(train_env_factory(cfg), cfg.rollout.tasks_per_step * cfg.rollout.group_size)
        try:
            update = build_update(policy)
            saved = await _resume(cfg, run, policy, update)
            result = await _train(cfg, policy, update, run, pool, rounds, saved)
            update.finish(run)
            return result
        finally:
            pool.close()
            await close_engine(engine)

    return asyncio.run(main())


async def _resume(
    cfg: OnPolicyStageConfig, run: RunDir, policy: Policy, update: PolicyUpdate
) -> SavedState | None:
    """For a reopened ``run``: restore its training state into the policy and the update
    (built as the saved run built them: references copy the starting weights) and sync the
    engine to it, stamped with the saved step's policy version."""
    saved = resumed_state(cfg, run)
    if saved is not None:
        restore(saved, _trained(policy, update))
        await policy.engine.update_weights(policy.learner.named_weights(), version=saved.step)
        print(f"[{cfg.stage}] resumed after step {saved.step} from {saved.path}", file=sys.stderr)
    return saved


def _trained(policy: Policy, update: PolicyUpdate) -> Trained:
    """What a training state holds: the policy, its learner and the update's learners."""
    extra = update.learners()
    learners = {"policy": policy.learner} | extra
    return Trained(policy.model, policy.tokenizer, learners, {n: x.model for n, x in extra.items()})


@dataclass
class _Progress:
    """What the loop carries from step to step besides weights, saved in a training state."""

    before: EvalResult | None
    """The held-out evaluation before training (the stage's result reports it)."""
    watch: SignalWatch
    """Steps in a row without a learning signal (``trainer.stop_without_signal``)."""
    nonfinite: NonFiniteWatch
    """Steps skipped for a non-finite loss, in all and in a row."""
    elapsed_s: float = 0.0
    """Training time spent before this process started (``trainer.max_time_s`` counts it)."""
    started: float = dataclasses.field(default_factory=time.perf_counter)
    """When this process started training (``time.perf_counter``)."""

    @classmethod
    def of(cls, cfg: OnPolicyStageConfig, saved: SavedState | None, before: EvalResult | None):
        """Fresh counters, or those ``saved`` holds."""
        progress = cls(
            before, SignalWatch(cfg.trainer.no_signal_steps), NonFiniteWatch(cfg.trainer)
        )
        if saved is not None:
            record = saved.progress
            progress.before = eval_from_record(record["before"])
            progress.watch.without_tool_calls, progress.watch.without_signal = record["watch"]
            progress.nonfinite.total, progress.nonfinite.in_a_row = record["nonfinite"]
            progress.elapsed_s = record["elapsed_s"]
        return progress

    def seconds(self) -> float:
        """Training time so far, this process's and the runs' it resumes."""
        return self.elapsed_s + time.perf_counter() - self.started

    def record(self, producer: RolloutProducer, step: int) -> dict[str, Any]:
        """JSON-ready progress after ``step`` (with the producer's counts) for a state."""
        stats = dataclasses.replace(producer.stats, steps_produced=step)
        return {
            "before": eval_record(self.before),
            "watch": [self.watch.without_tool_calls, self.watch.without_signal],
            "nonfinite": [self.nonfinite.total, self.nonfinite.in_a_row],
            "elapsed_s": self.seconds(),
            "producer": stats.record(),
        }


async def _train(
    cfg: OnPolicyStageConfig,
    policy: Policy,
    update: PolicyUpdate,
    run: RunDir,
    pool: EnvPool,
    rounds: int,
    saved: SavedState | None,
) -> StageResult:
    _audit_template(cfg, policy, pool)
    if cfg.verify_every:  # the engine must start from the learner's weights
        await _verify_sync(cfg, policy, policy.renderer.prompt_ids(_PROBE))
    before = await _evaluate(cfg, policy, run, step=0) if cfg.eval.before and not saved else None
    progress = _Progress.of(cfg, saved, before)
    producer = rollout_producer(cfg, policy.engine, policy.renderer, pool, rounds)
    first = 1
    if saved is not None:
        first = saved.step + 1
        producer.stats = ProducerStats.from_record(saved.progress["producer"])
    steps, step, done = cfg.trainer.steps, first - 1, first - 1
    state = (saved.step, saved.path) if saved is not None else None  # the newest saved
    bar = step_bar(cfg, cfg.stage, first)
    loop = asyncio.get_running_loop()
    producer.start(first)
    with StopOnCtrlC(lambda: loop.call_soon_threadsafe(producer.cancel)) as stop:
        try:
            for step in bar:
                metrics = await _train_step(
                    cfg, policy, update, producer, run, step, progress.nonfinite, stop
                )
                done = step
                progress.nonfinite.check(step)
                return_freed_memory()
                bar.set_postfix(_progress(metrics))
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < steps:
                    await _evaluate(cfg, policy, run, step=step)
                stop_now = _should_stop(cfg, step, progress, metrics)  # counts this step
                if state_due(cfg, step) or stop.requested:
                    record = progress.record(producer, step)
                    path = save_training_state(cfg, run, _trained(policy, update), step, record)
                    state = (step, path)
                    if stop.requested:
                        raise TrainingInterrupted(step, path)
                if stop_now:
                    break
        except (TrainingInterrupted, KeyboardInterrupt):
            raise
        except BaseException:
            if not stop.requested:
                save_interrupted(policy.model, policy.tokenizer, run, step)
                raise
            # Ctrl-C cancelled the producer while this step collected: keep the last step's
            if done == 0:
                raise KeyboardInterrupt from None
            if state is not None and state[0] == done:  # saved already (or resumed from)
                path = state[1]
            else:
                record = progress.record(producer, done)
                path = save_training_state(cfg, run, _trained(policy, update), done, record)
            raise TrainingInterrupted(done, path) from None
        finally:
            bar.close()
            await producer.stop()
    after = await _evaluate(cfg, policy, run, step=step) if cfg.eval.after else None
    final = save_checkpoint(policy.model, policy.tokenizer, run.checkpoints / "final")
    run.plot()
    return StageResult(cfg.stage, str(final), before=progress.before, after=after)


def _should_stop(
    cfg: OnPolicyStageConfig, step: int, progress: _Progress, metrics: dict[str, float]
) -> bool:
    """Whether to end training after ``step``: no signal for too long, or out of time."""
    if progress.watch.update(metrics) and cfg.trainer.stop_without_signal:
        print(f"stopping at step {step}: trainer.stop_without_signal", file=sys.stderr)
        return True
    if cfg.trainer.max_time_s and progress.seconds() > cfg.trainer.max_time_s:
        print(
            f"time budget of {cfg.trainer.max_time_s:.0f} s reached at step {step}",
            file=sys.stderr,
        )
        return True
    return False


async def _train_step(
    cfg: OnPolicyStageConfig,
    policy: Policy,
    update: PolicyUpdate,
    producer: RolloutProducer,
    run: RunDir,
    step: int,
    nonfinite: NonFiniteWatch,
    stop: StopOnCtrlC,
) -> dict[str, float]:
    """One step: collect, filter, update, sync, log. After Ctrl-C (``stop``) the sync is
    skipped: the run ends with this step, and a resumed run syncs the engine itself."""
    started = time.perf_counter()
    # 1. collect (the producer sampled these while the previous steps trained)
    groups = await producer.next_batch(step, cfg.rollout.tasks_per_step)
    rollout_wait_s = time.perf_counter() - started
    # 2. filter infrastructure failures
    episodes = [tr for g in groups for tr in g]
    trajectories = [tr for tr in episodes if not tr.stop_reason.is_infra_failure]
    if not trajectories:
        raise AllEpisodesFailedError(
            f"step {step}: all {len(episodes)} episodes failed for infrastructure reasons "
            f"(engine or env errors); the first: {groups[0][0].info.get('error')}"
        )
    # 3. the stage's update: on a worker thread, so sampling goes on
    train_started = time.perf_counter()
    metrics = await asyncio.to_thread(update, trajectories)
    kill_point("update", step)
    train_s = time.perf_counter() - train_started
    metrics |= nonfinite.count(step, metrics)
    # 4. sync weights (waits for requests in flight to finish on the old weights); a step
    # skipped as non-finite changed no weight, but its version is synced all the same:
    # the producer's staleness bound counts versions, one per step
    sync_started = time.perf_counter()
    if not stop.requested:
        await policy.engine.update_weights(policy.learner.named_weights(), version=step)
        await producer.weights_updated()
    sync_s = time.perf_counter() - sync_started
    if cfg.verify_every and step % cfg.verify_every == 0 and not stop.requested:
        first = trajectories[0]  # one real sequence: its first training sample
        metrics |= await _verify_sync(cfg, policy, first.token_ids[slice(*first.segments[0])])
    # 5. log
    metrics |= rollout_metrics(trajectories, episodes)
    metrics |= producer_metrics(groups, step, producer, cfg.rollout.max_staleness)
    metrics |= engine_metrics(policy.engine)
    metrics |= step_resources(
        rollout_wait_s=rollout_wait_s,
        train_s=train_s,
        sync_s=sync_s,
        step_s=time.perf_counter() - started,
    )
    run.log(step, metrics)
    if cfg.run.log_trajectories:
        run.log_trajectories(step, trajectories[: cfg.run.log_trajectories], policy.renderer.decode)
    return metrics


def _progress(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's figures: reward and loss, and tool calls in a tool env."""
    shown = {
        "reward": f"{metrics['reward_mean']:.3f}",
        "loss": f"{metrics.get('loss', float('nan')):.4f}",
    }
    if "tool_calls_per_episode" in metrics:
        shown |= {
            "tools": f"{metrics['tool_calls_per_episode']:.2f}",
            "valid": f"{metrics['valid_call_rate']:.2f}",
            "parse_err": f"{metrics['parse_errors_per_episode']:.2f}",
            "turns": f"{metrics['turns_mean']:.1f}",
            "answered": f"{metrics['answered_frac']:.2f}",
            "out_of_turns": f"{metrics['out_of_turns_frac']:.2f}",
        }
    return shown


def _audit_template(cfg: OnPolicyStageConfig, policy: Policy, pool: EnvPool) -> None:
    """Check the chat template for what this run needs (more for multi-turn and tool envs)
    and print each verdict; a failed check that is not fatal (the audit raises for those)
    is a ``note`` saying what palaestra does instead."""
    _, info = pool.envs[0].reset(seed=cfg.seed)
    checks = audit_for_training(
        policy.tokenizer, multi_turn=cfg.rollout.max_turns > 1, tools=bool(info.get("tools"))
    )
    for check in checks:
        verdict = "ok  " if check.passed else "note"
        print(f"[chat template] {verdict} {check.name}: {check.detail}", file=sys.stderr)


_PROBE: Messages = [
    {"role": "user", "content": "Add 17 and 25, then explain the steps in one line."}
]
"""A conversation whose tokens probe the engine's weights before training starts."""


async def _verify_sync(
    cfg: OnPolicyStageConfig, policy: Policy, probe_ids: Sequence[int]
) -> dict[str, float]:
    """Check the engine scores ``probe_ids`` as the learner does; raises ``WeightSyncError``."""
    check = await verify_engine_weights(
        policy.engine,
        policy.model,
        probe_ids,
        tolerance=cfg.verify_tolerance or default_tolerance(cfg.precision().engine),
    )
    return {
        "sync/max_abs_dlogprob": check.max_abs_dlogprob,
        "sync/mean_abs_dlogprob": check.mean_abs_dlogprob,
    }


async def _evaluate(cfg: OnPolicyStageConfig, policy: Policy, run: RunDir, *, step: int):
    return await evaluate_on_env(cfg, policy.engine, policy.renderer, run, step=step)
