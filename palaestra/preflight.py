"""Preflight: what a run needs that can be checked without a model, checked before any run
directory is made and before any model is loaded.

``check_stages`` runs in ``palaestra train`` between loading the config and making the run
directory; ``check_model`` and ``check_env`` serve ``palaestra eval`` and ``palaestra
collect`` as well. A failure is one ``ConfigError`` naming the field and the fix
(``stages[1] (dpo): data.path: ...``). Checked, for every stage of a pipeline at once:

- devices: a ``cuda`` device is one this machine has;
- models: ``model`` (the first stage's; later stages train the checkpoint of the stage
  before), ``ppo.critic_model`` and each training env's ``reward_model.path`` name a known
  model or a directory with ``config.json``;
- envs: each env id is registered and its env builds with its kwargs on every split the
  stage uses (``train`` to train on-policy, ``test`` to evaluate), and is closed again;
- datasets: every line of every dataset parses with the one JSON-lines reader and has the
  fields its stage reads (the readers of ``trainer.data``), and ``data.eval_size`` leaves
  rows to train on;
- engines: vLLM is installed where a stage starts a vLLM engine (``engine: vllm`` of an
  on-policy stage, or of a dataset stage that evaluates on the env), so a pipeline does
  not train for an hour to fail at its first vLLM start. It is found, not imported:
  importing it takes seconds and sets up its logging before the engine configures it.

What loading the config refuses (types, ranges, inf and nan, duplicate keys, run names,
token budgets) is not repeated here. What this module does not do: load a model or a
tokenizer, reset an env, or start anything; broken weights and a conversation longer than
``data.max_length`` are found when the stage runs. A path inside ``run_root`` (the run
directory this run will make, where an earlier stage writes it) is not checked.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from palaestra.config import (
    DatasetStageConfig,
    DPOStage,
    EnvConfig,
    OnPolicyStageConfig,
    PPOStage,
    RewardModelStage,
)
from palaestra.errors import ConfigError

if TYPE_CHECKING:
    from palaestra.config import StageConfig, TrainConfig

PATH_NOTE = (
    "a relative path in a config file is read from the file's folder, one in an override "
    "(key=value) from the working directory"
)
"""Said wherever a path was not found: where a relative path is read from."""


def check_stages(stages: Sequence[TrainConfig], *, run_root: Path | None = None) -> None:
    """Check every stage of a run (one config, or a pipeline's stages) before it starts."""
    check_devices(sorted({config.device for config in stages}))
    built: set[str] = set()
    for i, config in enumerate(stages):
        where = f"stages[{i}] ({config.stage}): " if len(stages) > 1 else ""
        with _prefixed(where):
            if i == 0:
                check_model(config.model, field="model")
            _check_stage_models(config, run_root)
            for id_field, env, split in _env_uses(config):
                check_env(env.id, env.kwargs, split, id_field=id_field, built=built)
            if isinstance(config, DatasetStageConfig):
                _check_datasets(config)
            _check_engine(config)


def check_devices(devices: Sequence[str]) -> None:
    """Refuse a CUDA device this machine lacks (the config checks the spelling only: it
    loads without torch)."""
    if all(device == "cpu" for device in devices):
        return
    import torch

    for device in devices:
        if device == "cpu":
            continue
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {device!r}, but torch finds no CUDA device on this machine; "
                "set device=cpu"
            )
        count = torch.cuda.device_count()
        index = torch.device(device).index
        if index is not None and index >= count:
            raise ConfigError(
                f"device: {device!r}, but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )


def check_model(name: str, *, field: str) -> None:
    """Refuse a model that ``resolve_model`` would not find, without building or loading it."""
    from palaestra.errors import ModelNotFoundError
    from palaestra.models import check_model as find

    try:
        find(name)
    except ModelNotFoundError as exc:
        note = "" if Path(name).is_absolute() or name.startswith("~") else f" ({PATH_NOTE})"
        raise ConfigError(f"{field}: {exc}{note}") from None


def check_env(
    env_id: str,
    kwargs: dict[str, Any],
    split: str,
    *,
    id_field: str,
    kwargs_field: str | None = None,
    built: set[str] | None = None,
) -> None:
    """Build the env ``env_id`` on ``split`` with ``kwargs`` and close it; an unknown id fails
    naming ``id_field``, an env that refuses its kwargs naming ``kwargs_field`` (default
    ``<id_field's section>.kwargs``). ``built`` remembers what was built, to build it once."""
    from palaestra import envs
    from palaestra.envs.errors import UnknownEnvError

    key = json.dumps([env_id, kwargs, split], sort_keys=True, default=str)
    if built is not None and key in built:
        return
    kwargs_field = kwargs_field or f"{id_field.removesuffix('.id')}.kwargs"
    try:
        env = envs.make(env_id, **kwargs, split=split)
    except UnknownEnvError as exc:  # an unregistered id, or a module that registers none
        raise ConfigError(f"{id_field}: {_one_line(exc)} (`palaestra envs` lists them)") from None
    except Exception as exc:  # the env refused its arguments or the split
        field = kwargs_field if kwargs else id_field.removesuffix(".id")
        fix = "; check the argument names" if isinstance(exc, TypeError) else ""
        raise ConfigError(
            f"{field}: {env_id} cannot be built on its {split!r} split"
            f"{f' with kwargs {kwargs}' if kwargs else ''}: "
            f"{type(exc).__name__}: {_one_line(exc).rstrip('.')}{fix}"
        ) from None
    env.close()
    if built is not None:
        built.add(key)


def _check_stage_models(config: StageConfig, run_root: Path | None) -> None:
    """The other models a stage loads: PPO's critic and the learned rewards of its envs."""
    if not isinstance(config, OnPolicyStageConfig):
        return
    critic = config.ppo.critic_model if isinstance(config, PPOStage) else None
    if critic is not None and not _inside(critic, run_root):
        check_model(critic, field="ppo.critic_model")
    for field, env in _listed(config.env, "env"):
        path = env.reward_model.path if env.reward_model is not None else None
        if path is None or _inside(path, run_root):
            continue
        if not (Path(path).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"{field}.reward_model.path: {path} is not a model directory (no "
                "config.json): give the checkpoints/final folder of a reward_model stage "
                f"({PATH_NOTE})"
            )


def _check_engine(config: StageConfig) -> None:
    """Refuse ``engine: vllm`` where the stage would start vLLM and it is not installed."""
    if not _starts_vllm(config) or importlib.util.find_spec("vllm") is not None:
        return
    from palaestra.agent.engines.vllm import INSTALL_HINT

    raise ConfigError(
        f"engine: 'vllm', but vLLM is not installed: {INSTALL_HINT}; or set engine=transformers"
    )


def _starts_vllm(config: StageConfig) -> bool:
    """Whether the stage starts a vLLM engine: an on-policy stage for its rollouts, a dataset
    stage whose model generates (not a reward model) for its env evaluation."""
    if isinstance(config, OnPolicyStageConfig):
        return config.engine == "vllm"
    if isinstance(config, DatasetStageConfig) and not isinstance(config, RewardModelStage):
        return config.engine == "vllm" and (config.eval.before or config.eval.after)
    return False


def _env_uses(config: StageConfig) -> Iterator[tuple[str, EnvConfig, str]]:
    """``(field of its id, env, split)`` for each env the stage builds: the training envs of
    an on-policy stage on ``train``, the held-out envs on ``test`` if it evaluates."""
    if isinstance(config, OnPolicyStageConfig):
        for field, env in _listed(config.env, "env"):
            yield f"{field}.id", env, "train"
    evaluates = config.eval.before or config.eval.after or config.eval.every_steps > 0
    if evaluates:
        listed = config.env if config.eval.envs is None else config.eval.envs
        section = "env" if config.eval.envs is None else "eval.envs"
        for field, env in _listed(listed, section):
            yield f"{field}.id", env, "test"


def _listed(envs: EnvConfig | list[EnvConfig], section: str) -> list[tuple[str, EnvConfig]]:
    """Each env of a section with its field: ``env`` for one, ``env[i]`` in a list."""
    if isinstance(envs, EnvConfig):
        return [(section, envs)]
    return [(f"{section}[{i}]", env) for i, env in enumerate(envs)]


def _check_datasets(config: DatasetStageConfig) -> None:
    """Read ``data.path`` and ``data.eval_path`` as the stage will, every line checked."""
    from palaestra.trainer.data import held_out

    train = _read(config, "data.path", config.data.path, held=False)
    if config.data.eval_path is not None:
        _read(config, "data.eval_path", config.data.eval_path, held=True)
    elif config.data.eval_size:
        with _as_config_error("data.eval_size"):
            held_out(train, config.data.eval_size, config.seed, config.data.path)


def _read(config: DatasetStageConfig, field: str, path: Path | None, *, held: bool) -> list:
    with _as_config_error(field, missing=path is not None and not path.is_file()):
        return _reader(config, held)(path)


def _reader(config: DatasetStageConfig, held: bool) -> Callable[[Any], list]:
    """The stage's reader of its data: SFT examples; preference pairs (the reward model; the
    DPO family's training data unless ``dpo.loss`` is ``kto``, which takes labelled answers
    too); held-out DPO data may hold either."""
    from palaestra.trainer.data import pairs_only, read_preferences, read_sft

    if config.stage == "sft":
        return read_sft
    if isinstance(config, DPOStage) and (held or config.dpo.loss == "kto"):
        return read_preferences
    return lambda path: pairs_only(read_preferences(path), path)


@contextlib.contextmanager
def _as_config_error(field: str, *, missing: bool = False) -> Iterator[None]:
    """A dataset's ``DataError`` as a ``ConfigError`` naming ``field``."""
    from palaestra.trainer.errors import DataError

    try:
        yield
    except DataError as exc:
        note = f" ({PATH_NOTE})" if missing else ""
        raise ConfigError(f"{field}: {_one_line(exc)}{note}") from None


@contextlib.contextmanager
def _prefixed(where: str) -> Iterator[None]:
    """Name the stage (``stages[1] (dpo): ``) in front of a ``ConfigError`` raised inside."""
    try:
        yield
    except ConfigError as exc:
        if not where:
            raise
        raise ConfigError(f"{where}{exc}") from None


def _inside(path: str | Path, run_root: Path | None) -> bool:
    """Whether ``path`` lies in the run directory this run makes (an earlier stage writes it)."""
    if run_root is None:
        return False
    return Path(path).expanduser().absolute().is_relative_to(run_root.absolute())


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
