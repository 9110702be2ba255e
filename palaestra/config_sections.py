"""The sections of a run configuration: one pydantic model per YAML section.

Each section (``env:``, ``rollout:``, ``grpo:``, ``trainer:``, ...) is a frozen model that
forbids unknown keys and documents every field; a stage's config (``palaestra.config``)
holds the sections that stage uses. The closed option sets the fields choose from are
spelled once, in ``palaestra.options``.

What this module does not do: decide which stage takes which section, or load YAML
(``palaestra.config`` does both).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from palaestra.options import (
    Advantage,
    Aggregation,
    DPOLoss,
    DType,
    ImportanceSampling,
    KLEstimator,
    KLPlacement,
    LearnedRewardMode,
    RatioLevel,
    TurnCredit,
)


class FieldError(ValueError):
    """A check across fields failed; ``field`` is the one to change, dotted and relative to
    the model that raised it, so the message names it instead of the whole section."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Section(BaseModel):
    """Base of every config model: frozen, unknown keys refused, ``inf`` and ``nan``
    refused in every float field (a learning rate of ``.inf`` would turn every weight into
    nan), attribute docstrings kept as the fields' descriptions."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class LearnedRewardConfig(Section):
    """A reward model (trained by a ``reward_model`` stage) scoring an env's episodes."""

    path: str
    """The reward model's checkpoint directory (``checkpoints/final`` of its stage); in a
    config file, a relative path is read from the file's folder."""
    mode: LearnedRewardMode = "replace"
    """``replace`` the env's reward with the learned one, or ``add`` it to the env's."""
    weight: float = 1.0
    """Multiplies the learned reward."""


class EnvConfig(Section):
    """The environment episodes come from: training rollouts and evaluation."""

    id: str = "palaestra/Math-v0"
    """Registered env id (``palaestra envs`` lists them)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the env constructor (e.g. ``source``, ``size``)."""
    reward_model: LearnedRewardConfig | None = None
    """Score finished episodes with a learned reward model (the RLHF path); see
    ``palaestra.agent.learned_reward`` for what it does and the reward-hacking caveat."""
    weight: float = Field(1.0, gt=0)
    """Where ``env`` lists several envs: this env's share of the training tasks is its
    weight over the sum of the weights."""

    @field_validator("kwargs")
    @classmethod
    def _finite_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The typed fields refuse ``inf`` and ``nan`` (``Section``); the free-form
        arguments are checked here."""
        for where, value in _leaves(kwargs):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where} is {value}: give the env a finite number")
        return kwargs


def _leaves(data: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every value inside nested mappings and lists, with its dotted path."""
    if isinstance(data, dict):
        items: Any = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        yield where, data
        return
    for key, value in items:
        yield from _leaves(value, f"{where}.{key}" if where else str(key))


class RolloutConfig(Section):
    """How training episodes are sampled: tasks per step, group size, limits."""

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
    samples at most what is left, and the episode stops (``max_tokens``) when none is. It
    must exceed ``max_tokens``: the prompt takes its share first, so a budget of
    ``max_tokens`` or less never lets a turn sample ``max_tokens``. A prompt that fills it
    alone ends the episode before anything is sampled: leave room for the env's prompts."""
    max_episode_s: float | None = Field(None, gt=0)
    """Wall-clock limit per episode, in seconds; an episode over it stops with ``timeout``,
    an infrastructure failure kept out of the gradient."""
    max_staleness: int = Field(0, ge=0)
    """How many policy versions a trajectory may lag the learner. 0 is synchronous: each
    step samples on the weights of the step before. N > 0 lets rollouts for the next steps
    run while the learner trains; groups older than N versions are dropped and counted."""

    @field_validator("max_total_tokens")
    @classmethod
    def _room_to_sample(cls, max_total_tokens: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")  # absent if it failed its own check
        if max_total_tokens is None or max_tokens is None:
            return max_total_tokens
        if max_total_tokens <= max_tokens:
            raise ValueError(
                f"must exceed rollout.max_tokens ({max_tokens}), as it holds the prompt too: "
                "raise it above the longest prompt plus max_tokens, or lower rollout.max_tokens"
            )
        return max_total_tokens


class GRPOConfig(Section):
    """The GRPO family's policy update (GRPO, DAPO, Dr.GRPO, GSPO, RLOO, REINFORCE++):
    advantages, clipping, KL and importance sampling."""

    advantage: Advantage = "grpo"
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
    ratio_level: RatioLevel = "token"
    """Importance ratio per token (GRPO, DAPO) or per sequence, the geometric mean of its
    token ratios (GSPO; pair with ``aggregation: seq-mean-token-mean``)."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """Lower clip range: ratios below 1 - clip_low stop pushing down."""
    clip_high: float = Field(0.2, ge=0)
    """Upper clip range: ratios above 1 + clip_high stop pushing up (DAPO uses 0.28)."""
    aggregation: Aggregation = "token-mean"
    """How per-token losses become one number (see ``trainer.losses.policy_loss``)."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference model; 0 loads no reference model."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimator (Schulman's k1, k2, k3)."""
    kl_placement: KLPlacement = "reward"
    """Subtract the KL from the reward (default) or add it to the loss."""
    importance_sampling: ImportanceSampling = "token"
    """Correct for the engine that sampled (decoupled PPO): clip against the learner's own
    logprobs before the step and weigh tokens by the truncated ratio learner / engine, per
    token or per sequence. Costs one extra forward pass; logs the mismatch (|dlogprob|, ESS)."""
    is_cap: float = Field(2.0, ge=1)
    """Truncation level of the importance weights."""
    turn_credit: TurnCredit = "episode"
    """How multi-turn episodes credit their turns: ``episode`` gives every sampled token
    the episode's group advantage on its total reward; ``return_to_go`` gives each turn's
    tokens the advantage of the rewards from that turn on, against the group's mean at the
    same turn index (for envs with per-turn rewards). The same on single-turn envs."""

    @field_validator("importance_sampling", mode="before")
    @classmethod
    def _off_is_a_word(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` (``grpo.importance_sampling=off``) as false: take it."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_turn_credit(self) -> GRPOConfig:
        if self.turn_credit == "return_to_go" and self.advantage != "grpo":
            raise FieldError(
                "turn_credit",
                "turn_credit 'return_to_go' computes GRPO's group advantages per turn; it "
                f"does not combine with advantage {self.advantage!r}",
            )
        if (
            self.turn_credit == "return_to_go"
            and self.kl_coef > 0
            and self.kl_placement == "reward"
        ):
            raise FieldError(
                "turn_credit",
                "turn_credit 'return_to_go' does not combine with a KL penalty in the reward "
                "(it is one number per episode, not per turn): set kl_placement: loss",
            )
        return self


class PPOConfig(Section):
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
    checkpoint; in a config file, a relative directory is read from the file's folder);
    default the policy's starting weights. It gets a fresh scalar value head."""
    critic_warmup_steps: int = Field(0, ge=0)
    """First steps that train only the critic, so the policy starts on useful values."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the batch's sampled tokens."""


class DPOConfig(Section):
    """The preference family (``stage: dpo`` and ``stage: online_dpo``)."""

    loss: DPOLoss = "sigmoid"
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


class LoRAConfig(Section):
    """LoRA adapters (peft) on the policy: only the adapters train, the base weights stay
    frozen, and the reference policy is the base with its adapters disabled (no second
    copy of the weights). See ``palaestra.trainer.adapters``."""

    rank: int = Field(16, ge=1)
    """Rank of each adapter's low-rank update ``B @ A``."""
    alpha: int = Field(32, ge=1)
    """Scale of the update: it is multiplied by ``alpha / rank``."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on each adapter's input while training (0: none)."""
    target_modules: str | list[str] = "all-linear"
    """The layers that get an adapter: ``all-linear`` (every linear layer but the output
    head: the attention and MLP projections) or a list of module names (``q_proj``,
    ``v_proj``, ...), each matched against the end of a module's dotted name."""

    @field_validator("target_modules")
    @classmethod
    def _named_modules(cls, modules: str | list[str]) -> str | list[str]:
        if isinstance(modules, str) and modules != "all-linear":
            raise ValueError(
                "must be 'all-linear' or a list of module names (e.g. [q_proj, v_proj])"
            )
        if isinstance(modules, list) and (not modules or not all(m.strip() for m in modules)):
            raise ValueError("list at least one module name, none of them empty")
        if isinstance(modules, list) and len(set(modules)) != len(modules):
            raise ValueError("names a module twice")
        return modules


class DataConfig(Section):
    """Dataset for the ``sft``, ``dpo`` and ``reward_model`` stages (JSON lines)."""

    path: Path | None = None
    """Training data. SFT: ``{"messages": [...]}`` or ``{"prompt", "completion"}`` per line.
    Preferences: ``{"prompt", "chosen", "rejected"}`` (strings or chat messages); KTO also
    takes unpaired ``{"prompt", "completion", "label": true|false}``. In a config file, a
    relative path is read from the file's folder; on the command line (an override), from
    the working directory. Every line is read and checked before the run starts."""
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


class ServerConfig(Section):
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


AdamBeta = Annotated[float, Field(ge=0, lt=1)]
"""A decay rate of AdamW's running averages, in [0, 1)."""


class TrainerConfig(Section):
    """Optimisation: steps, AdamW, warm-up, micro-batching, clipping, precision."""

    steps: int = Field(20, ge=1)
    """Optimizer steps (one rollout batch each)."""
    lr: float = Field(1e-5, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.99)
    """AdamW betas: the decay rates of the gradient's running mean and of its square."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up steps."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per forward/backward; gradients accumulate over the step's batch."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""
    dtype: DType = "auto"
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
    no_signal_steps: int = Field(3, ge=0)
    """On-policy stages: after this many steps in a row without a learning signal (a tool
    env where no tool call was parsed, or every group's rewards equal), say so loudly with
    the likely causes and remedies; 0 turns the check off."""
    stop_without_signal: bool = False
    """Stop the run (keeping its weights) when that warning fires, instead of training on."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop the run after this many steps in a row whose loss or gradient norm was NaN or
    inf. Each such step is skipped (the weights, optimizer and schedule stay as they were),
    counted (``train/nonfinite_steps``) and printed; the stop names the likely causes and
    keeps the weights of the last step that trained."""


class EvalConfig(Section):
    """Evaluation on the env's held-out tasks, before and after training."""

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
    every_steps: int = Field(0, ge=0)
    """Also evaluate every N training steps (on-policy stages), so the run shows held-out
    success curves; 0: only before and after."""
    envs: list[EnvConfig] | None = None
    """Held-out envs to evaluate on, each on its own test split (``weight`` unused); default
    the training envs (``env``)."""


class RunConfig(Section):
    """Where and how a run writes its directory."""

    output_dir: Path = Path("runs")
    """Parent folder of run directories; a relative one is inside the working directory
    (not the config file's folder), as with other trainers' output directories."""
    name: str | None = None
    """Run directory name, one folder inside ``output_dir`` (no ``/``, not ``..``);
    defaults to the config name and a timestamp."""
    save_every: int = Field(0, ge=0)
    """Save a training-state checkpoint (``checkpoints/state-<step>``: weights, optimizer,
    schedule, random states, loop position) every N steps, for ``--resume`` (0: only the
    final checkpoint, and a state when the run is interrupted)."""
    keep_last: int = Field(2, ge=0)
    """How many of the newest training-state checkpoints to keep (0: all)."""
    log_trajectories: int = Field(4, ge=0)
    """Trajectories per step written to ``trajectories.jsonl``."""
    progress: bool = True
    """Show a progress bar."""

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        if name is not None and ("/" in name or name in ("", ".", "..")):
            raise ValueError(
                "must be one folder name (no '/', not '.' or '..') so the run stays inside "
                "run.output_dir; to write elsewhere, set run.output_dir"
            )
        return name
