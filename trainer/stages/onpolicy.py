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
4. **sync**: copy the new weights into the engine, stamped with the next policy version;
   every ``verify_every`` steps (and once before training), check that the engine scores a
   sequence as the learner does (``trainer.weight_sync``).
5. **log / checkpoint**: rewards, train/inference mismatch, staleness histogram, phase
   times, memory.

Evaluation on the env's held-out split runs before and after training. Where a new
algorithm goes: a ``PolicyUpdate`` in its stage module, built from a ``Policy``; this
loop does not change.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm import tqdm

from palaestra.agent.engines.base import Engine
from palaestra.agent.engines.build import close_engine
from palaestra.agent.producer import RolloutProducer
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool
from palaestra.agent.template_audit import audit_for_training
from palaestra.agent.trajectory import Trajectory
from palaestra.config import GRPOConfig, OnPolicyStageConfig
from palaestra.envs.core import Messages
from palaestra.models import load_model, resolve_model
from palaestra.rundir import RunDir
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.errors import AllEpisodesFailedError
from palaestra.trainer.learner import Learner
from palaestra.trainer.stages.common import (
    StageResult,
    evaluate_on_env,
    open_engine,
    policy_learner,
    return_freed_memory,
    save_interrupted,
    train_env_factory,
)
from palaestra.trainer.stages.health import SignalWatch
from palaestra.trainer.stages.sampling import rollout_producer
from palaestra.trainer.stages.step_metrics import producer_metrics, rollout_metrics, step_resources
from palaestra.trainer.weight_sync import default_tolerance, verify_engine_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
        model, tokenizer = load_model(resolve_model(cfg.model), device=cfg.device)
        engine = open_engine(cfg, model, tokenizer)
        policy = Policy(
            model, tokenizer, engine, ChatRenderer(tokenizer), policy_learner(cfg, model)
        )
        pool = EnvPool(train_env_factory(cfg), cfg.rollout.tasks_per_step * cfg.rollout.group_size)
        try:
            update = build_update(policy)
            result = await _train(cfg, policy, update, run, pool, rounds)
            update.finish(run)
            return result
        finally:
            pool.close()
            await close_engine(engine)

    return asyncio.run(main())


async def _train(
    cfg: OnPolicyStageConfig,
    policy: Policy,
    update: PolicyUpdate,
    run: RunDir,
    pool: EnvPool,
    rounds: int,
) -> StageResult:
    _audit_template(cfg, policy, pool)
    if cfg.verify_every:  # the engine must start from the learner's weights
        await _verify_sync(cfg, policy, policy.renderer.prompt_ids(_PROBE))
    before = await _evaluate(cfg, policy, run, step=0) if cfg.eval.before else None
    producer = rollout_producer(cfg, policy.engine, policy.renderer, pool, rounds)
    steps, step = cfg.trainer.steps, 0
    bar = tqdm(range(1, steps + 1), desc=cfg.stage, disable=not cfg.run.progress, file=sys.stderr)
    producer.start()
    started = time.perf_counter()
    watch = SignalWatch(cfg.trainer.no_signal_steps)
    try:
        for step in bar:
            metrics = await _train_step(cfg, policy, update, producer, run, step)
            return_freed_memory()
            bar.set_postfix(_progress(metrics))
            if cfg.run.save_every and step % cfg.run.save_every == 0 and step < steps:
                save_checkpoint(policy.model, policy.tokenizer, run.checkpoints / f"step-{step}")
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < steps:
                await _evaluate(cfg, policy, run, step=step)
            if watch.update(metrics) and cfg.trainer.stop_without_signal:
                print(f"stopping at step {step}: trainer.stop_without_signal", file=sys.stderr)
                break
            if cfg.trainer.max_time_s and time.perf_counter() - started > cfg.trainer.max_time_s:
                print(
                    f"time budget of {cfg.trainer.max_time_s:.0f} s reached at step {step}",
                    file=sys.stderr,
                )
                break
    except BaseException:
        save_interrupted(policy.model, policy.tokenizer, run, step)
        raise
    finally:
        bar.close()
        await producer.stop()
    after = await _evaluate(cfg, policy, run, step=step) if cfg.eval.after else None
    final = save_checkpoint(policy.model, policy.tokenizer, run.checkpoints / "final")
    run.plot()
    return StageResult(cfg.stage, str(final), before=before, after=after)


async def _train_step(
    cfg: OnPolicyStageConfig,
    policy: Policy,
    update: PolicyUpdate,
    producer: RolloutProducer,
    run: RunDir,
    step: int,
) -> dict[str, float]:
    """One step: collect, filter, update, sync, log."""
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
    train_s = time.perf_counter() - train_started
    # 4. sync weights (waits for requests in flight to finish on the old weights)
    sync_started = time.perf_counter()
    await policy.engine.update_weights(policy.learner.named_weights(), version=step)
    await producer.weights_updated()
    sync_s = time.perf_counter() - sync_started
    if cfg.verify_every and step % cfg.verify_every == 0:
        first = trajectories[0]  # one real sequence: its first training sample
        metrics |= await _verify_sync(cfg, policy, first.token_ids[slice(*first.segments[0])])
    # 5. log
    metrics |= rollout_metrics(trajectories, episodes)
    metrics |= producer_metrics(groups, step, producer, cfg.rollout.max_staleness)
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
