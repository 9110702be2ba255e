"""Training-state checkpoints: everything a stage needs to continue exactly where it stopped.

A stage saves one every ``run.save_every`` steps, when it is interrupted (Ctrl-C) and when
a step fails outside the learner's update; the last ``run.keep_last`` are kept::

    checkpoints/state-<step>/
      config.json, model.safetensors, tokenizer files   the policy, Hugging Face format
                                                         (loadable on its own), its own dtype
      adapter/       instead, with ``lora``: the adapter alone (peft's format); the frozen
                     base is the stage's starting model, loaded again on resume
      optimizer.pt   each learner's AdamW and warm-up schedule state and step count
      <name>.pt      the weights of any other module the stage trains (PPO's ``critic``)
      rng.pt         Python's, NumPy's and torch's (CPU and CUDA) random states
      state.json     the step, the loop's progress (data position, producer counters, the
                     evaluation before training) and the training-relevant config

Each is written atomically (``checkpoint.write_atomically``). ``--resume`` reads the newest
complete one (``latest_state``), refuses it if the training-relevant config changed
(``load_state``: every section but ``run``, ``eval`` and a dataset stage's ``engine``,
and ``trainer`` but its ``steps`` and ``max_time_s``), and ``restore`` puts weights,
optimizer states and random states back after the stage has built its model, so a
reference model built from the stage's starting weights is the same as in the run that
saved it.

What this module does not do: decide when to save, or what a loop's progress holds (the
loops ``stages.dataset`` and ``stages.onpolicy`` do).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from palaestra.errors import ConfigError
from palaestra.options import DATASET_STAGES
from palaestra.trainer.adapters import is_adapted, load_adapter, save_adapter
from palaestra.trainer.checkpoint import (
    OLD_SUFFIX,
    PARTIAL_SUFFIX,
    check_finite_weights,
    save_weights,
    write_atomically,
)
from palaestra.trainer.learner import Learner

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STATE_PREFIX = "state-"
"""A training-state directory is ``checkpoints/state-<step>``."""

KILL_ENV = "PALAESTRA_KILL_AT"
"""Test hook (``kill_point``): ``<point>:<step>`` kills the process there with SIGKILL."""

_UNCHECKED_SECTIONS = ("run", "eval")
_UNCHECKED_TRAINER = ("steps", "max_time_s")


@dataclass(frozen=True)
class SavedState:
    """A training-state checkpoint read back (weights and optimizer states stay on disk
    until ``restore``)."""

    path: Path
    """The ``state-<step>`` directory."""
    step: int
    """The last step it had completed: training continues at ``step + 1``."""
    progress: dict[str, Any]
    """The loop's own progress, as it saved it."""


@dataclass(frozen=True)
class Trained:
    """What a stage trains and must save: the policy, its learners and other modules."""

    model: PreTrainedModel
    """The policy, saved in Hugging Face format."""
    tokenizer: PreTrainedTokenizerBase
    """Saved beside the policy."""
    learners: Mapping[str, Learner]
    """Each learner by name (``policy``, ``critic``): their optimizer and schedule states."""
    modules: Mapping[str, torch.nn.Module]
    """Modules trained besides the policy, by name (``critic``), saved as ``<name>.pt``."""


def save_state(
    checkpoints: Path,
    step: int,
    trained: Trained,
    *,
    progress: Mapping[str, Any],
    config: Mapping[str, Any],
    keep_last: int,
) -> Path:
    """Write ``checkpoints/state-<step>`` atomically, then drop all but the newest
    ``keep_last`` states (0 keeps all); returns its path. Non-finite weights are refused
    (``checkpoint.check_finite_weights``), writing nothing."""

    for module in [trained.model, *trained.modules.values()]:
        check_finite_weights(module)

    def write(tmp: Path) -> None:
        if is_adapted(trained.model):  # the base is the stage's starting model: not saved
            save_adapter(trained.model, tmp)
            trained.tokenizer.save_pretrained(tmp)
        else:
            save_weights(trained.model, trained.tokenizer, tmp)
        torch.save({n: learner.state_dict() for n, learner in trained.learners.items()},
                   tmp / "optimizer.pt")  # fmt: skip
        for name, module in trained.modules.items():
            torch.save(module.state_dict(), tmp / f"{name}.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        kill_point("checkpoint", step)
        record = {"step": step, "progress": dict(progress), "config": training_config(config)}
        (tmp / "state.json").write_text(json.dumps(record, indent=1))

    path = write_atomically(checkpoints / f"{STATE_PREFIX}{step}", write)
    _prune(checkpoints, keep_last)
    return path


def latest_state(checkpoints: Path) -> Path | None:
    """The newest complete ``state-<step>`` directory in ``checkpoints``, if any."""
    states = _states(checkpoints)
    return states[-1][1] if states else None


def state_step(path: Path) -> int:
    """The step a training-state directory was saved after."""
    return int(json.loads((path / "state.json").read_text())["step"])


def load_state(path: Path, config: Mapping[str, Any]) -> SavedState:
    """Read ``path``'s record; ``ConfigError`` if the run's training-relevant config
    (``training_config``) differs from the one it was saved with."""
    record = json.loads((path / "state.json").read_text())
    saved, now = record["config"], training_config(config)
    if saved != now:
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        raise ConfigError(
            f"--resume: {path} was saved with a different training config (sections "
            f"{', '.join(changed)} differ); resume with the config the run started with, "
            "or start a new run"
        )
    return SavedState(path, int(record["step"]), record["progress"])


def restore(saved: SavedState, trained: Trained) -> None:
    """Load ``saved``'s weights, optimizer and schedule states and random states into
    ``trained`` (built as the run that saved it built it) and this process."""
    if is_adapted(trained.model):
        _load_adapter(trained.model, saved.path)
    else:
        _load_hf_weights(trained.model, saved.path)
    for name, module in trained.modules.items():
        module.load_state_dict(torch.load(saved.path / f"{name}.pt", weights_only=True))
    states = torch.load(saved.path / "optimizer.pt", weights_only=True)
    for name, learner in trained.learners.items():
        learner.load_state_dict(states[name])
    _set_rng_state(torch.load(saved.path / "rng.pt", weights_only=True))


def training_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The sections of a stage's config (``model_dump(mode="json")``) a resumed run must
    share with the run it continues: all but ``run`` and ``eval`` (and a dataset stage's
    ``engine``, which samples its evaluation only), and ``trainer`` without ``steps`` and
    ``max_time_s`` (a run may be resumed to train longer)."""
    unchecked: tuple[str, ...] = _UNCHECKED_SECTIONS
    if config.get("stage") in DATASET_STAGES:
        unchecked = (*unchecked, "engine")
    kept = {k: v for k, v in config.items() if k not in unchecked}
    if isinstance(kept.get("trainer"), dict):
        kept["trainer"] = {k: v for k, v in kept["trainer"].items() if k not in _UNCHECKED_TRAINER}
    return kept


def kill_point(point: str, step: int) -> None:
    """Test hook: when ``$PALAESTRA_KILL_AT`` is ``<point>:<step>``, kill this process here
    with SIGKILL, as a crash or an out-of-memory kill would. Points: ``update`` right after
    a step's learner update (nothing of it saved yet), ``checkpoint`` halfway through
    writing a training state. Unset, it does nothing."""
    if os.environ.get(KILL_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _load_adapter(model: PeftModel, path: Path) -> None:
    """Load the adapter a LoRA run's state in ``path`` holds into ``model`` in place."""
    try:
        load_adapter(model, path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {exc}") from None


def _load_hf_weights(model: PreTrainedModel, path: Path) -> None:
    """Load the safetensors weights in ``path`` into ``model`` in place; a weight missing
    from the files must be tied to one that is there (e.g. tied embeddings)."""
    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        loaded |= load_file(file)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    pointers = {name: t.data_ptr() for name, t in model.state_dict().items()}
    present = {pointers[name] for name in loaded if name in pointers}
    untied = [name for name in missing if pointers[name] not in present]
    if untied or unexpected:
        raise ConfigError(
            f"--resume: the weights in {path} do not fit the stage's model "
            f"(missing {untied[:3]}, unexpected {list(unexpected)[:3]})"
        )


def _states(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete ``state-<step>`` directories of ``checkpoints``, oldest first. A state
    being replaced is renamed ``state-<step>.old`` first (``write_atomically``); if the
    process died before the new one took its name, the ``.old`` one is the state."""
    found: dict[int, Path] = {}
    for path in sorted(checkpoints.glob(f"{STATE_PREFIX}*"), key=lambda p: p.name):
        match = re.fullmatch(rf"{STATE_PREFIX}(\d+)({re.escape(OLD_SUFFIX)})?", path.name)
        if match and (path / "state.json").is_file():
            step = int(match.group(1))
            if step not in found or not match.group(2):
                found[step] = path
    return sorted(found.items())


def _prune(checkpoints: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` states (0: keep all), leftover partials and
    replaced states."""
    for partial in checkpoints.glob(f"{STATE_PREFIX}*{PARTIAL_SUFFIX}"):
        shutil.rmtree(partial, ignore_errors=True)
    kept = {path for _, path in _states(checkpoints)}
    for old in checkpoints.glob(f"{STATE_PREFIX}*{OLD_SUFFIX}"):
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    if keep_last:
        for _, path in _states(checkpoints)[:-keep_last]:
            shutil.rmtree(path)


def _rng_state() -> dict[str, Any]:
    """Every random state a step may draw from, as tensors and plain values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a stage after ``step`` had completed; its training state is at ``path``
    (``palaestra train CONFIG --resume RUN_DIR`` continues it)."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"interrupted at step {step}; training state saved to {path}")
        self.step = step
        self.path = path
