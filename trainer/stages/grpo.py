"""GRPO stage: sample groups, score them relative to each other, take a clipped step.

One step, top to bottom:

1. **collect**: take ``tasks_per_step`` groups of ``group_size`` episodes from the rollout
   producer (``agent.producer``), which samples them concurrently in the background, at
   most ``rollout.max_staleness`` policy versions behind the learner (0: on exactly the
   weights of the previous step). Groups over the bound are dropped and counted.
2. **filter**: drop infrastructure failures (engine or env errors): they say nothing about
   the policy and are counted, never trained as reward 0.
3. **rewards**: with a KL coefficient and ``kl_placement: reward``, subtract
   ``beta * KL(policy || reference)`` from each episode's reward.
4. **advantages**: centre rewards within each group (and divide by the group's std unless
   Dr.GRPO's ``scale_by_std: false``).
5. **learner.step**: token-level clipped surrogate over the sampled tokens; with
   ``importance_sampling`` on (the default) it clips against the learner's own logprobs
   before the step and weighs tokens by the truncated ratio learner / engine, which
   corrects both for staleness and for engine numerics. It runs on a worker thread, so the
   producer keeps sampling the next steps meanwhile.
6. **sync**: copy the new weights into the engine, stamped with the next policy version;
   every ``verify_every`` steps (and once before training), check that the engine scores a
   sequence as the learner does (``trainer.weight_sync``).
7. **log / checkpoint**: rewards, train/inference mismatch, staleness histogram, phase
   times, memory.

Evaluation on the env's held-out split runs before and after training.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.engines.build import ServerSettings, build_engine, close_engine
from palaestra.agent.evaluate import EvalResult
from palaestra.agent.producer import DynamicSampling, RolloutProducer
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, episode_metrics
from palaestra.agent.template_audit import audit_for_training
from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.config import TrainConfig
from palaestra.envs.core import Messages
from palaestra.models import load_model, resolve_dtype, resolve_model, turn_end_ids
from palaestra.rundir import RunDir
from palaestra.trainer.advantages import (
    grouped_advantages,
    grouped_turn_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)
from palaestra.trainer.batch import TokenBatch, collate, rows_of_token_values
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.errors import AllEpisodesFailedError
from palaestra.trainer.learner import Learner
from palaestra.trainer.losses import behaviour_weights, kl_penalized_rewards, policy_loss
from palaestra.trainer.stages.common import (
    StageResult,
    build_learner,
    evaluate_on_env,
    frozen_copy,
    peak_rss_gb,
    return_freed_memory,
    rss_gb,
    save_interrupted,
    train_env_factory,
)
from palaestra.trainer.weight_sync import default_tolerance, verify_engine_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def run_grpo(config: TrainConfig, run: RunDir) -> StageResult:
    """Run a GRPO stage as configured, writing into ``run``."""
    return asyncio.run(run_policy_gradient(config, run, _learn))


Learn = Callable[[TrainConfig, "Parts", list[Trajectory]], dict[str, float]]
"""Steps 3-5 of a policy-gradient stage: trajectories in, one learner step, metrics out.
GRPO's is ``_learn``; PPO (``stages.ppo``) passes its own, with a critic, to the same loop."""


async def run_policy_gradient(cfg: TrainConfig, run: RunDir, learn: Learn) -> StageResult:
    """The loop of this module with ``learn`` as its steps 3-5 (see the module docstring)."""
    torch.manual_seed(cfg.seed)
    parts = _build(cfg, learn)
    try:
        return await _train(cfg, parts, run)
    finally:
        await parts.aclose()


@dataclass
class Parts:
    """What a policy-gradient run trains and samples with."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: PreTrainedModel | None
    engine: Engine
    renderer: ChatRenderer
    learner: Learner
    learn: Learn
    """Steps 3-5 of each training step."""

    async def aclose(self) -> None:
        """Stop the engine's processes or connections (vLLM runs its own processes)."""
        await close_engine(self.engine)


async def _train(cfg: TrainConfig, parts: Parts, run: RunDir) -> StageResult:
    episodes = cfg.rollout.tasks_per_step * cfg.rollout.group_size
    pool = EnvPool(train_env_factory(cfg), episodes)
    try:
        return await _train_with(cfg, parts, run, pool)
    finally:
        pool.close()


async def _train_with(cfg: TrainConfig, parts: Parts, run: RunDir, pool: EnvPool) -> StageResult:
    _audit_template(cfg, parts, pool)
    if cfg.verify_every:  # the engine must start from the learner's weights
        await _verify_sync(cfg, parts, parts.renderer.prompt_ids(_PROBE))
    before = await _evaluate(cfg, parts, run, step=0) if cfg.eval.before else None
    producer = RolloutProducer(
        pool,
        parts.engine,
        parts.renderer,
        SamplingParams(
            max_tokens=cfg.rollout.max_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
        ),
        lambda step: _group_requests(cfg, step),
        env_id=cfg.env.id,
        max_turns=cfg.rollout.max_turns,
        max_total_tokens=cfg.rollout.max_total_tokens,
        max_episode_s=cfg.rollout.max_episode_s,
        max_staleness=cfg.rollout.max_staleness,
        queue_groups=cfg.rollout.tasks_per_step * (cfg.rollout.max_staleness + 1),
        dynamic_sampling=DynamicSampling(
            keep=_informative,
            more_requests=lambda step, round, n: _group_requests(cfg, step, round, n),
            max_rounds=cfg.grpo.dynamic_sampling_rounds,
        )
        if cfg.grpo.dynamic_sampling
        else None,
    )
    steps = cfg.trainer.steps
    bar = tqdm(range(1, steps + 1), desc=cfg.stage, disable=not cfg.run.progress, file=sys.stderr)
    step = 0
    producer.start()
    started = time.perf_counter()
    try:
        for step in bar:
            metrics = await _train_step(cfg, parts, producer, run, step)
            return_freed_memory()
            bar.set_postfix(
                reward=f"{metrics['reward_mean']:.3f}",
                loss=f"{metrics.get('loss', float('nan')):.4f}",
            )
            if cfg.run.save_every and step % cfg.run.save_every == 0 and step < steps:
                save_checkpoint(parts.model, parts.tokenizer, run.checkpoints / f"step-{step}")
            if cfg.trainer.max_time_s and time.perf_counter() - started > cfg.trainer.max_time_s:
                print(
                    f"time budget of {cfg.trainer.max_time_s:.0f} s reached at step {step}",
                    file=sys.stderr,
                )
                break
    except BaseException:
        save_interrupted(parts.model, parts.tokenizer, run, step)
        raise
    finally:
        bar.close()
        await producer.stop()
    after = await _evaluate(cfg, parts, run, step=step) if cfg.eval.after else None
    final = save_checkpoint(parts.model, parts.tokenizer, run.checkpoints / "final")
    run.plot()
    return StageResult(cfg.stage, str(final), before=before, after=after)


def _audit_template(cfg: TrainConfig, parts: Parts, pool: EnvPool) -> None:
    """Check the chat template for what this run needs (more for multi-turn and tool envs)
    and print each verdict with what palaestra does about a failure."""
    _, info = pool.envs[0].reset(seed=cfg.seed)
    checks = audit_for_training(
        parts.tokenizer, multi_turn=cfg.rollout.max_turns > 1, tools=bool(info.get("tools"))
    )
    for check in checks:
        verdict = "ok  " if check.passed else "FAIL"
        print(f"[chat template] {verdict} {check.name}: {check.detail}", file=sys.stderr)


_PROBE: Messages = [
    {"role": "user", "content": "Add 17 and 25, then explain the steps in one line."}
]
"""A conversation whose tokens probe the engine's weights before training starts."""


def _build(cfg: TrainConfig, learn: Learn) -> Parts:
    """Load the policy (and a reference when the KL is on), the engine and the learner."""
    model_dir = resolve_model(cfg.model)
    model, tokenizer = load_model(model_dir, device=cfg.device)
    server = cfg.server
    engine = build_engine(
        cfg.engine,
        model=frozen_copy(model) if cfg.engine == "transformers" else model,
        model_dir=model_dir,
        eos_token_ids=turn_end_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        dtype=cfg.engine_dtype,
        device=cfg.device,
        seed=cfg.seed,
        max_batch_size=cfg.rollout.tasks_per_step * cfg.rollout.group_size,
        server=ServerSettings(
            url=str(server.url),
            model_name=server.model_name or cfg.model,
            api_key=os.environ.get(server.api_key_env) if server.api_key_env else None,
            timeout_s=server.timeout_s,
            max_retries=server.max_retries,
        )
        if cfg.engine == "openai"
        else None,
    )
    learner = build_learner(cfg, model)
    reference = frozen_copy(model) if cfg.grpo.kl_coef > 0 else None
    return Parts(model, tokenizer, reference, engine, ChatRenderer(tokenizer), learner, learn)


async def _train_step(
    cfg: TrainConfig, parts: Parts, producer: RolloutProducer, run: RunDir, step: int
) -> dict[str, float]:
    """One GRPO step: collect, filter, reward, advantages, learn, sync, log."""
    started = time.perf_counter()
    # 1. collect (the producer sampled these while the previous steps trained)
    groups = await producer.next_batch(step, cfg.rollout.tasks_per_step)
    rollout_wait_s = time.perf_counter() - started
    staleness = [(step - 1) - min(tr.policy_version for tr in g) for g in groups]
    # 2. filter infrastructure failures
    episodes = [tr for g in groups for tr in g]
    trajectories = [tr for tr in episodes if not tr.stop_reason.is_infra_failure]
    infra_failures = len(episodes) - len(trajectories)
    if not trajectories:
        raise AllEpisodesFailedError(
            f"step {step}: all {infra_failures} episodes failed for infrastructure reasons "
            f"(engine or env errors); the first: {groups[0][0].info.get('error')}"
        )
    # 3-5. rewards, advantages, learner step: on a worker thread, so sampling goes on
    train_started = time.perf_counter()
    metrics = await asyncio.to_thread(parts.learn, cfg, parts, trajectories)
    train_s = time.perf_counter() - train_started
    # 6. sync weights (waits for requests in flight to finish on the old weights)
    sync_started = time.perf_counter()
    await parts.engine.update_weights(parts.learner.named_weights(), version=step)
    await producer.weights_updated()
    sync_s = time.perf_counter() - sync_started
    if cfg.verify_every and step % cfg.verify_every == 0:
        first = trajectories[0]  # one real sequence: its first training sample
        metrics |= await _verify_sync(cfg, parts, first.token_ids[slice(*first.segments[0])])
    # 7. log
    metrics |= _rollout_metrics(trajectories, episodes)
    metrics |= _producer_metrics(staleness, producer, cfg.rollout.max_staleness)
    metrics |= {
        "time/rollout_wait_s": rollout_wait_s,
        "time/train_s": train_s,
        "time/sync_s": sync_s,
        "time/step_s": time.perf_counter() - started,
        "memory/rss_gb": rss_gb(),
        "memory/peak_rss_gb": peak_rss_gb(),
    }
    run.log(step, metrics)
    if cfg.run.log_trajectories:
        run.log_trajectories(step, trajectories[: cfg.run.log_trajectories], parts.renderer.decode)
    return metrics


def _learn(cfg: TrainConfig, parts: Parts, trajectories: list[Trajectory]) -> dict[str, float]:
    """Steps 3-5: rewards (KL-penalised if so configured), group advantages, learner step."""
    trajectories = sorted(trajectories, key=lambda tr: -len(tr.token_ids))  # less padding
    # one row per training sample: a trajectory, or each segment of one the template split
    batch = collate(trajectories, [0.0] * len(trajectories), pad_id=parts.tokenizer.pad_token_id)
    rewards_E = torch.tensor([tr.reward for tr in trajectories])
    reward_metrics: dict[str, float] = {}
    if parts.reference is not None:
        ref_BT = parts.learner.score(parts.reference, batch)
        batch = batch.with_ref_logprobs(ref_BT)
        if cfg.grpo.kl_placement == "reward":  # each row's penalty, summed per episode
            penalty_B, reward_metrics = kl_penalized_rewards(
                torch.zeros(len(batch)),
                batch.old_logprobs_BT,
                ref_BT,
                batch.loss_mask_BT,
                beta=cfg.grpo.kl_coef,
                estimator=cfg.grpo.kl_estimator,
            )
            rewards_E = rewards_E + batch.sum_per_episode(penalty_B, len(trajectories))
    if cfg.grpo.overlong_buffer:
        lengths_E = torch.tensor([tr.num_sampled_tokens for tr in trajectories])
        max_length = cfg.rollout.max_tokens * cfg.rollout.max_turns
        penalty_E = overlong_penalty(
            lengths_E,
            max_length=max_length,
            buffer=min(cfg.grpo.overlong_buffer, max_length),
            factor=cfg.grpo.overlong_penalty,
        )
        rewards_E = rewards_E + penalty_E
        reward_metrics["reward/overlong_penalty"] = float(penalty_E.mean())
    group_ids = torch.tensor([tr.group_id for tr in trajectories])
    advantages_E = _advantages(cfg, rewards_E, group_ids)
    batch = dataclasses.replace(batch, advantages_B=advantages_E[_rows_episode(batch)])
    if cfg.grpo.overlong_filter:
        batch = _without_truncated(batch, trajectories)
    if cfg.grpo.turn_credit == "return_to_go":
        batch = dataclasses.replace(
            batch, token_advantages_BT=_turn_advantages_BT(cfg, trajectories, group_ids)
        )
    batch, mismatch = behaviour_correction(cfg, parts.learner, batch)
    return parts.learner.step(batch, policy_loss_fn(cfg)) | mismatch | reward_metrics


def _advantages(cfg: TrainConfig, rewards_E: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """One advantage per episode, by the configured estimator."""
    if cfg.grpo.advantage == "rloo":
        return rloo_advantages(rewards_E, group_ids)
    if cfg.grpo.advantage == "reinforce_pp":
        return reinforce_pp_advantages(rewards_E, group_ids)
    return grouped_advantages(rewards_E, group_ids, scale_by_std=cfg.grpo.scale_by_std)


def _without_truncated(batch: TokenBatch, trajectories: list[Trajectory]) -> TokenBatch:
    """The batch with the loss masked on episodes cut at the token limit (unless that is
    every episode: then nothing would be left to train on, and the batch stays whole)."""
    truncated_E = torch.tensor([tr.stop_reason is StopReason.MAX_TOKENS for tr in trajectories])
    keep_B = ~truncated_E[_rows_episode(batch)]
    if not keep_B.any():
        return batch
    return dataclasses.replace(batch, loss_mask_BT=batch.loss_mask_BT * keep_B[:, None])


def _rows_episode(batch: TokenBatch) -> torch.Tensor:
    """Which trajectory each row of a collated batch came from."""
    if batch.episode_B is None:
        raise ValueError("the batch was not built by collate: it has no episode_B")
    return batch.episode_B


def _turn_advantages_BT(
    cfg: TrainConfig, trajectories: list[Trajectory], group_ids: torch.Tensor
) -> torch.Tensor:
    """Each sampled token gets its turn's advantage: the return-to-go from that turn
    against the group's mean at the same turn index (``grouped_turn_advantages``)."""
    returns = [tr.turn_returns_to_go() for tr in trajectories]
    per_turn = grouped_turn_advantages(returns, group_ids, scale_by_std=cfg.grpo.scale_by_std)
    per_token = [
        tr.per_token(advantages.tolist())
        for tr, advantages in zip(trajectories, per_turn, strict=True)
    ]
    return rows_of_token_values(trajectories, per_token)


async def _verify_sync(
    cfg: TrainConfig, parts: Parts, probe_ids: Sequence[int]
) -> dict[str, float]:
    """Check the engine scores ``probe_ids`` as the learner does; raises ``WeightSyncError``."""
    check = await verify_engine_weights(
        parts.engine,
        parts.model,
        probe_ids,
        tolerance=cfg.verify_tolerance
        or default_tolerance(resolve_dtype(cfg.engine_dtype, cfg.device)),
    )
    return {
        "sync/max_abs_dlogprob": check.max_abs_dlogprob,
        "sync/mean_abs_dlogprob": check.mean_abs_dlogprob,
    }


def _group_requests(
    cfg: TrainConfig, step: int, round: int = 0, count: int | None = None
) -> list[list[EpisodeRequest]]:
    """The groups of training step ``step``: one reset seed per group, so all its episodes
    get the same task, and distinct sampling seeds. A function of the seed, the step and the
    dynamic-sampling ``round`` (0: the step's own groups) only, so a step's tasks do not
    depend on when they are sampled; group ids are unique across steps and rounds."""
    rng = np.random.default_rng([cfg.seed, step, round])
    tasks = cfg.rollout.tasks_per_step
    first_group_id = ((step - 1) * (cfg.grpo.dynamic_sampling_rounds + 1) + round) * tasks
    groups = []
    for g in range(tasks if count is None else count):
        reset_seed = int(rng.integers(2**31))
        groups.append(
            [
                EpisodeRequest(
                    group_id=first_group_id + g,
                    reset_seed=reset_seed,
                    sampling_seed=int(rng.integers(2**31)),
                )
                for _ in range(cfg.rollout.group_size)
            ]
        )
    return groups


def _informative(group: list[Trajectory]) -> bool:
    """Whether a group's trainable episodes differ in reward (else its advantages are 0)."""
    rewards = {tr.reward for tr in group if not tr.stop_reason.is_infra_failure}
    return len(rewards) > 1


def _producer_metrics(
    staleness: list[int], producer: RolloutProducer, max_staleness: int
) -> dict[str, float]:
    """This step's staleness histogram (groups per lag, in policy versions), and the
    producer's running counts of stale and dynamic-sampling drops."""
    return {
        "staleness/mean": float(np.mean(staleness)),
        "staleness/max": float(max(staleness)),
        **{f"staleness/groups_{k}": float(staleness.count(k)) for k in range(max_staleness + 1)},
        "staleness/dropped_groups_total": float(producer.stats.groups_dropped_stale),
        "dynamic_sampling/groups_rejected_total": float(producer.stats.groups_rejected),
        "dynamic_sampling/replacement_rounds_total": float(producer.stats.replacement_rounds),
        "dynamic_sampling/rejected_groups_used_total": float(producer.stats.rejected_groups_used),
    }


def behaviour_correction(
    cfg: TrainConfig, learner: Learner, batch: TokenBatch
) -> tuple[TokenBatch, dict[str, float]]:
    """With importance sampling on: clip against the learner's logprobs before this step
    (the proximal policy) and weigh tokens by the truncated ratio learner / engine."""
    if cfg.grpo.importance_sampling == "off":
        return batch, {}
    proximal_BT = learner.score(learner.model, batch)
    weights_BT, metrics = behaviour_weights(
        proximal_BT,
        batch.old_logprobs_BT,
        batch.loss_mask_BT,
        cap=cfg.grpo.is_cap,
        level=cfg.grpo.importance_sampling,
    )
    return dataclasses.replace(
        batch, old_logprobs_BT=proximal_BT, is_weights_BT=weights_BT
    ), metrics


def policy_loss_fn(cfg: TrainConfig) -> Any:
    g = cfg.grpo
    in_loss = g.kl_coef > 0 and g.kl_placement == "loss"

    def loss(batch: TokenBatch, logprobs_BT: torch.Tensor, *, num_tokens: float, num_seqs: float):
        return policy_loss(
            logprobs_BT,
            batch.old_logprobs_BT,
            batch.advantages_B,
            batch.loss_mask_BT,
            clip_low=g.clip_low,
            clip_high=g.clip_high,
            aggregation=g.aggregation,
            ref_logprobs_BT=batch.ref_logprobs_BT if in_loss else None,
            is_weights_BT=batch.is_weights_BT,
            token_advantages_BT=batch.token_advantages_BT,
            ratio_level=g.ratio_level,
            kl_coef=g.kl_coef if in_loss else 0.0,
            kl_estimator=g.kl_estimator,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            max_seq_len=cfg.rollout.max_tokens * cfg.rollout.max_turns,
        )

    return loss


def _rollout_metrics(
    trajectories: list[Trajectory], episodes: list[Trajectory]
) -> dict[str, float]:
    """Rewards, lengths and group statistics of the ``trajectories`` trained on, and how
    every one of the step's ``episodes`` ended (infrastructure failures included)."""
    rewards = np.array([tr.reward for tr in trajectories])
    lengths = np.array([tr.num_sampled_tokens for tr in trajectories])
    by_group: dict[int, list[float]] = {}
    for tr in trajectories:
        by_group.setdefault(tr.group_id, []).append(tr.reward)
    solved_all = sum(min(r) > 0 for r in by_group.values())
    uniform = sum(max(r) == min(r) for r in by_group.values())
    components: dict[str, list[float]] = {}
    for tr in trajectories:
        for name, value in tr.reward_components.items():
            components.setdefault(name, []).append(value)
    return {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "tokens_mean": float(lengths.mean()),
        "truncated_frac": float(
            np.mean([tr.stop_reason.value == "max_tokens" for tr in trajectories])
        ),
        "groups_uniform_frac": uniform / len(by_group),
        "groups_all_solved_frac": solved_all / len(by_group),
        "infra_failures": float(len(episodes) - len(trajectories)),
        **episode_metrics(episodes),
        **{f"reward/{k}": float(np.mean(v)) for k, v in components.items()},
    }


async def _evaluate(cfg: TrainConfig, parts: Parts, run: RunDir, *, step: int) -> EvalResult:
    return await evaluate_on_env(cfg, parts.engine, parts.renderer, run, step=step)
