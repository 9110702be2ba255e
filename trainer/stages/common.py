"""What every training stage shares: its result, the policy learner and the engine built
from the config, the held-out evaluation on the env, frozen model copies, step
bookkeeping and memory.

A stage is a function ``run_<stage>(config, run) -> StageResult`` in its own module of
this package; ``palaestra.pipeline`` runs a list of them in order, each on the checkpoint
the one before wrote. Stages import this module and the loops (``onpolicy``,
``dataset``), never each other.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gymnasium as gym

from palaestra import envs
from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.engines.build import ServerSettings, build_engine, close_engine
from palaestra.agent.evaluate import EvalResult, evaluate
from palaestra.agent.learned_reward import LearnedReward, RewardModelScorer
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, RolloutLimits
from palaestra.config import OnPolicyStageConfig, StageConfig
from palaestra.models import resolve_model, turn_end_ids
from palaestra.rundir import RunDir
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.learner import Learner, OptimSettings, policy_forward

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class StageResult:
    """What a stage produced: its final checkpoint and how it changed the model."""

    stage: str
    """The stage's name (``sft``, ``dpo``, ``grpo``, ...)."""
    checkpoint: str
    """Path of the final checkpoint; the next stage of a pipeline starts from it."""
    before: EvalResult | None = None
    """Held-out evaluation on the env before training (if enabled)."""
    after: EvalResult | None = None
    """Held-out evaluation on the env after training (if enabled)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The stage's own held-out measures, before and after (e.g. ``eval/loss_before``,
    ``eval/loss_after`` for SFT; ``eval/pref_accuracy_after`` for DPO)."""


def policy_learner(
    cfg: StageConfig, model: PreTrainedModel, *, temperature: float | None = None
) -> Learner:
    """A learner over the policy ``model`` with the ``trainer`` section's settings, scoring
    at the rollout temperature (or ``temperature``: 1 for stages trained on datasets)."""
    return Learner(
        model,
        OptimSettings.of(cfg.trainer),
        forward=policy_forward(cfg.rollout.temperature if temperature is None else temperature),
        precision=cfg.precision(),
    )


def open_engine(
    cfg: StageConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    share_weights: bool = False,
) -> Engine:
    """The rollout engine the config asks for, on ``model``'s weights: an on-policy stage's
    ``engine`` (with its ``server``), or a transformers engine for the other stages.
    A transformers engine samples with a frozen copy, so training never touches it, unless
    ``share_weights`` (evaluation only: nothing trains ``model``)."""
    kind, server = "transformers", None
    if isinstance(cfg, OnPolicyStageConfig):
        kind = cfg.engine
        server = _server(cfg) if kind == "openai" else None
    copy_weights = kind == "transformers" and not share_weights
    return build_engine(
        kind,
        model=frozen_copy(model) if copy_weights else model,
        model_dir=resolve_model(cfg.model),
        eos_token_ids=turn_end_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        dtype=cfg.precision().engine,
        device=cfg.device,
        seed=cfg.seed,
        max_batch_size=cfg.rollout.tasks_per_step * cfg.rollout.group_size,
        server=server,
    )


def _server(cfg: OnPolicyStageConfig) -> ServerSettings:
    server = cfg.server
    return ServerSettings(
        url=str(server.url),
        model_name=server.model_name or cfg.model,
        api_key=os.environ.get(server.api_key_env) if server.api_key_env else None,
        timeout_s=server.timeout_s,
        max_retries=server.max_retries,
    )


def rollout_limits(cfg: StageConfig) -> RolloutLimits:
    """The ``rollout`` section's per-episode limits."""
    r = cfg.rollout
    return RolloutLimits(
        max_turns=r.max_turns, max_total_tokens=r.max_total_tokens, max_episode_s=r.max_episode_s
    )


def train_env_factory(cfg: StageConfig) -> Callable[[], gym.Env]:
    """A function building the configured env's training split; with
    ``env.reward_model`` set, wrapped so a reward model scores each finished episode (the
    model is loaded once here and shared by every env the function builds). Held-out
    evaluation never wraps: it measures the env's own reward."""
    learned = cfg.env.reward_model
    if learned is None:
        return lambda: envs.make(cfg.env.id, **cfg.env.kwargs, split="train")
    scorer = RewardModelScorer(learned.path, device=cfg.device)
    return lambda: LearnedReward(
        envs.make(cfg.env.id, **cfg.env.kwargs, split="train"),
        scorer,
        mode=learned.mode,
        weight=learned.weight,
    )


async def evaluate_on_env(
    cfg: StageConfig, engine: Engine, renderer: ChatRenderer, run: RunDir, *, step: int
) -> EvalResult:
    """Evaluate ``engine``'s policy on the env's held-out split as the ``eval`` section
    says; logs the result to ``run`` (kind ``eval``) and prints a summary."""
    e = cfg.eval
    pool = EnvPool(lambda: envs.make(cfg.env.id, **cfg.env.kwargs, split="test"), 64)
    sampling = SamplingParams(
        max_tokens=e.max_tokens or cfg.rollout.max_tokens, temperature=e.temperature
    )
    try:
        result, episodes = await evaluate(
            pool,
            engine,
            renderer,
            sampling,
            env_id=cfg.env.id,
            num_tasks=e.num_tasks,
            samples=e.samples,
            limits=rollout_limits(cfg),
            seed=cfg.seed,
        )
    finally:
        pool.close()
    run.log(
        step,
        {
            "accuracy": result.accuracy,
            "mean_tokens": result.mean_tokens,
            **{f"pass@{k}": v for k, v in result.pass_at.items()},
        },
        kind="eval",
    )
    run.log_trajectories(step, episodes[: cfg.run.log_trajectories], renderer.decode, kind="eval")
    print(f"[eval @ step {step}] {result.summary()}", file=sys.stderr)
    return result


async def evaluate_model(
    cfg: StageConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    run: RunDir,
    *,
    step: int,
) -> EvalResult:
    """``evaluate_on_env`` for a stage without a rollout engine: samples with a
    transformers engine on a frozen copy of ``model``, dropped afterwards."""
    engine = open_engine(cfg, model, tokenizer)
    try:
        return await evaluate_on_env(cfg, engine, ChatRenderer(tokenizer), run, step=step)
    finally:
        await close_engine(engine)


def end_step(
    cfg: StageConfig,
    run: RunDir,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    step: int,
    metrics: dict[str, float],
    started: float,
) -> None:
    """Log a step (with its time and peak memory) and save the ``run.save_every``
    checkpoint."""
    metrics |= {"time/step_s": time.perf_counter() - started, "memory/peak_rss_gb": peak_rss_gb()}
    run.log(step, metrics)
    if cfg.run.save_every and step % cfg.run.save_every == 0 and step < cfg.trainer.steps:
        save_checkpoint(model, tokenizer, run.checkpoints / f"step-{step}")


def save_interrupted(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run: RunDir, step: int
) -> None:
    """After a failure at ``step``, keep what the steps before trained (``interrupted``)."""
    if step > 1:
        path = save_checkpoint(model, tokenizer, run.checkpoints / "interrupted")
        print(f"training stopped at step {step}; weights saved to {path}", file=sys.stderr)


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of ``model`` with no gradients, in eval mode (a reference, or an engine's)."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone.eval()


def rss_gb() -> float:
    """Resident memory of this process now, in GiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    """The most resident memory this process has had, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS, where the C library can (glibc's malloc_trim).

    Rollouts decode and learning run on different worker threads, so their allocations
    land in different malloc arenas; without trimming, each arena keeps its high-water mark
    and peak memory becomes the sum of the two phases instead of the larger.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
