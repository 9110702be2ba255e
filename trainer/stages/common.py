"""What every training stage shares: its result, the policy (LoRA-wrapped when configured),
its reference, learner and engine built from the config, the held-out evaluation on the
env, frozen model copies, step bookkeeping (logging, training-state checkpoints,
resuming, Ctrl-C) and memory.

A stage is a function ``run_<stage>(config, run) -> StageResult`` in its own module of
this package; ``palaestra.pipeline`` runs a list of them in order, each on the checkpoint
the one before wrote. Stages import this module and the loops (``onpolicy``,
``dataset``), never each other.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch
from tqdm import tqdm

from palaestra import envs
from palaestra.agent.engines.base import Engine, SamplingParams
from palaestra.agent.engines.build import ServerSettings, build_engine, close_engine
from palaestra.agent.evaluate import EvalResult, evaluate, summarize
from palaestra.agent.learned_reward import LearnedReward, RewardModelScorer
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, RolloutLimits
from palaestra.agent.trajectory import Trajectory
from palaestra.config import (
    DatasetStageConfig,
    EnvConfig,
    LoRAConfig,
    OnPolicyStageConfig,
    StageConfig,
)
from palaestra.envs.mixture import EnvMixture
from palaestra.models import load_model, resolve_model, turn_end_ids
from palaestra.rundir import RunDir
from palaestra.trainer.adapters import AdaptersOff, is_adapted, with_adapters
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.errors import NonFiniteWeightsError
from palaestra.trainer.learner import Learner, OptimSettings, policy_forward
from palaestra.trainer.train_state import (
    STATE_PREFIX,
    SavedState,
    Trained,
    load_state,
    save_state,
)

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


def load_policy(
    cfg: StageConfig, lora: LoRAConfig | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The stage's starting model and tokenizer; with ``lora`` (the stage's), the model
    wrapped with fresh LoRA adapters (``trainer.adapters``), of which only they train."""
    model, tokenizer = load_model(resolve_model(cfg.model), device=cfg.device)
    if lora is not None:
        model = with_adapters(model, lora)  # type: ignore[assignment]  # a peft wrapper
    return model, tokenizer


def reference_policy(model: PreTrainedModel) -> torch.nn.Module:
    """The reference a KL or a preference loss compares the policy with: its starting
    weights. A frozen copy of ``model`` (taken before training), or, for a model with LoRA
    adapters, the model itself with its adapters disabled (no copy)."""
    return AdaptersOff(model) if is_adapted(model) else frozen_copy(model)


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
    cfg: OnPolicyStageConfig | DatasetStageConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    share_weights: bool = False,
) -> Engine:
    """The engine the stage's ``engine`` names (an on-policy stage's rollouts, a dataset
    stage's held-out evaluation; ``openai`` with the ``server`` section), on ``model``'s
    weights. A transformers engine samples with a frozen copy, so training never touches
    it, unless ``share_weights`` (evaluation only: nothing trains ``model``). A vLLM
    engine starts on the weights of the stage's starting model (``cfg.model``), an OpenAI
    engine on its server's: ``update_weights`` gives either ``model``'s."""
    server = None
    if isinstance(cfg, OnPolicyStageConfig) and cfg.engine == "openai":
        server = _server(cfg)
    copy_weights = cfg.engine == "transformers" and not share_weights
    return build_engine(
        cfg.engine,
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
    """A function building the training split of the configured env, or of the mixture of
    envs ``env`` lists (``envs.EnvMixture``: each task drawn from one env by weight). An env
    with ``reward_model`` set is wrapped so a reward model scores each finished episode (the
    model is loaded once here and shared by every env the function builds). Held-out
    evaluation never wraps: it measures the env's own reward."""
    members = cfg.train_envs()
    scorers = {
        e.id: RewardModelScorer(e.reward_model.path, device=cfg.device)
        for e in members
        if e.reward_model is not None
    }

    def make(e: EnvConfig) -> gym.Env:
        env = envs.make(e.id, **e.kwargs, split="train")
        if e.reward_model is None:
            return env
        learned = e.reward_model
        return LearnedReward(env, scorers[e.id], mode=learned.mode, weight=learned.weight)

    if len(members) == 1:
        return lambda: make(members[0])
    return lambda: EnvMixture([(e.id, make(e), e.weight) for e in members])


def env_label(cfg: StageConfig) -> str:
    """The name of what the stage trains on: the env's id, or the mixture's ids joined."""
    return "+".join(e.id for e in cfg.train_envs())


async def evaluate_on_env(
    cfg: StageConfig, engine: Engine, renderer: ChatRenderer, run: RunDir, *, step: int
) -> EvalResult:
    """Evaluate ``engine``'s policy on each held-out env's test split as the ``eval``
    section says; logs each env's success (``<env>/success``, ``<env>/pass@k``) and the
    whole (``accuracy``: every env's episodes together) to ``run`` (kind ``eval``), prints
    a summary per env, and returns the whole."""
    held_out = cfg.eval_envs()
    metrics: dict[str, float] = {}
    episodes: list[Trajectory] = []
    tasks = 0
    for e in held_out:
        result, played = await _evaluate_one(cfg, e, engine, renderer)
        metrics |= {f"{e.id}/success": result.accuracy}
        metrics |= {f"{e.id}/pass@{k}": v for k, v in result.pass_at.items()}
        print(f"[eval @ step {step}] {e.id}: {result.summary()}", file=sys.stderr)
        offset = len(episodes) and max(t.group_id for t in episodes) + 1
        episodes += [dataclasses.replace(t, group_id=t.group_id + offset) for t in played]
        tasks += result.num_tasks
    whole = summarize(episodes, num_tasks=tasks, samples=cfg.eval.samples)
    if len(held_out) > 1:
        print(f"[eval @ step {step}] all envs: {whole.summary()}", file=sys.stderr)
    metrics |= {"accuracy": whole.accuracy, "mean_tokens": whole.mean_tokens}
    metrics |= {f"pass@{k}": v for k, v in whole.pass_at.items()}
    run.log(step, metrics, kind="eval")
    run.log_trajectories(step, episodes[: cfg.run.log_trajectories], renderer.decode, kind="eval")
    return whole


async def _evaluate_one(
    cfg: StageConfig, e: EnvConfig, engine: Engine, renderer: ChatRenderer
) -> tuple[EvalResult, list[Trajectory]]:
    """One held-out env's result and episodes."""
    pool = EnvPool(lambda: envs.make(e.id, **e.kwargs, split="test"), 64)
    sampling = SamplingParams(
        max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens, temperature=cfg.eval.temperature
    )
    try:
        return await evaluate(
            pool,
            engine,
            renderer,
            sampling,
            env_id=e.id,
            num_tasks=cfg.eval.num_tasks,
            samples=cfg.eval.samples,
            limits=rollout_limits(cfg),
            seed=cfg.seed,
        )
    finally:
        pool.close()


async def evaluate_model(
    cfg: DatasetStageConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    run: RunDir,
    *,
    step: int,
) -> EvalResult:
    """``evaluate_on_env`` for a stage without a rollout engine, on ``model``'s weights as
    they are after ``step`` steps, in an engine of the stage's ``engine`` closed afterwards:
    a transformers engine samples with a frozen copy of ``model``; a vLLM engine starts on
    the stage's starting model and is given ``model``'s weights (``update_weights``, version
    ``step``) before it samples."""
    engine = open_engine(cfg, model, tokenizer)
    try:
        if cfg.engine == "vllm":  # started on the starting model's weights, not model's
            await engine.update_weights(model.state_dict().items(), version=step)
        return await evaluate_on_env(cfg, engine, ChatRenderer(tokenizer), run, step=step)
    finally:
        await close_engine(engine)


def log_step(run: RunDir, step: int, metrics: dict[str, float], started: float) -> None:
    """Log a step with its time and peak memory."""
    metrics |= {"time/step_s": time.perf_counter() - started, "memory/peak_rss_gb": peak_rss_gb()}
    run.log(step, metrics)


def state_due(cfg: StageConfig, step: int) -> bool:
    """Whether ``step`` ends with a ``run.save_every`` training-state checkpoint (never the
    last step: the final checkpoint follows it)."""
    every = cfg.run.save_every
    return bool(every) and step % every == 0 and step < cfg.trainer.steps


def save_training_state(
    cfg: StageConfig, run: RunDir, trained: Trained, step: int, progress: dict[str, Any]
) -> Path:
    """Write the training state after ``step`` (``trainer.train_state``), keeping the
    newest ``run.keep_last``."""
    return save_state(
        run.checkpoints,
        step,
        trained,
        progress=progress,
        config=cfg.model_dump(mode="json"),
        keep_last=cfg.run.keep_last,
    )


def resumed_state(cfg: StageConfig, run: RunDir) -> SavedState | None:
    """The training state a reopened ``run`` continues from (None for a new run);
    ``ConfigError`` if the training-relevant config changed since it was saved."""
    if run.resumed_step is None:
        return None
    return load_state(
        run.checkpoints / f"{STATE_PREFIX}{run.resumed_step}", cfg.model_dump(mode="json")
    )


def eval_record(result: EvalResult | None) -> dict[str, Any] | None:
    """An evaluation as JSON-ready data (a training state keeps the one before training)."""
    return None if result is None else dataclasses.asdict(result)


def eval_from_record(record: dict[str, Any] | None) -> EvalResult | None:
    """The ``EvalResult`` ``eval_record`` wrote (JSON turns its int keys into strings)."""
    if record is None:
        return None
    int_keyed = ("pass_at", "pass_hat", "success_by_turns", "episodes_by_turns")
    fields = {k: {int(i): v for i, v in record[k].items()} for k in int_keyed}
    return EvalResult(**(record | fields))


def save_interrupted(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run: RunDir, step: int
) -> None:
    """After a failure at ``step``, keep what the steps before trained (``interrupted``),
    unless the weights are not finite: then say so and keep the checkpoints there are."""
    if step > 1:
        try:
            path = save_checkpoint(model, tokenizer, run.checkpoints / "interrupted")
        except NonFiniteWeightsError as exc:
            print(f"training stopped at step {step}; weights not saved: {exc}", file=sys.stderr)
            return
        print(f"training stopped at step {step}; weights saved to {path}", file=sys.stderr)


def step_bar(cfg: StageConfig, name: str, first: int) -> tqdm[int]:
    """The progress bar over steps ``first`` .. ``trainer.steps`` (a resumed run's bar
    starts where the run stopped)."""
    steps = cfg.trainer.steps
    return tqdm(
        range(first, steps + 1),
        desc=name,
        initial=first - 1,
        total=steps,
        disable=not cfg.run.progress,
        file=sys.stderr,
    )


class StopOnCtrlC:
    """Ctrl-C as a request to stop: while active (``with``), the first SIGINT sets
    ``requested`` and calls ``on_stop`` (a loop stops at its next safe point and saves its
    training state); a second SIGINT raises ``KeyboardInterrupt`` at once. Outside the main
    thread (where no signal handler can be set) it does nothing."""

    def __init__(self, on_stop: Callable[[], object] = lambda: None) -> None:
        self.requested = False
        self.on_stop = on_stop
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopOnCtrlC:
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:  # None: a handler set from C, which Python cannot set back
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping and saving the training state (again to quit now)", file=sys.stderr
        )
        self.on_stop()


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
