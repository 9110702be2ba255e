"""Checkpoints in Hugging Face format, loadable with ``from_pretrained``, written atomically.

A checkpoint is a directory with the model's config, safetensors weights, generation
config and tokenizer files. A model trained with LoRA adapters is saved merged (a plain
Hugging Face model), its adapter beside it in ``adapter/`` (``trainer.adapters``).

``write_atomically`` is how every checkpoint directory is written (these, and the
training states of ``trainer.train_state``): into a temporary sibling ``<name>.partial``,
every file and the directory fsynced, every file given the permissions a new file gets
under the process's umask (safetensors alone would write its file ``0600`` beside
``0644`` siblings), then renamed into place and the parent fsynced. A crash or ``kill -9``
never leaves half a directory under the final name: a leftover ``.partial`` is garbage,
and a directory being replaced is renamed to ``<name>.old`` just before the new one takes
its name (only a crash between those two renames leaves it there).

Weights are saved in the dtype the model holds them in (float32 master weights stay
float32), never cast. Weights holding NaN or inf are refused (``NonFiniteWeightsError``)
and nothing is written, so a checkpoint never holds them and the one before stays.

What this module does not do: save optimizer, RNG or loop state (``trainer.train_state``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from palaestra.rundir import fsync_path
from palaestra.trainer.adapters import is_adapted, save_merged
from palaestra.trainer.errors import NonFiniteWeightsError

PARTIAL_SUFFIX = ".partial"
"""Suffix of a directory still being written; never read back."""
OLD_SUFFIX = ".old"
"""Suffix of a directory being replaced, until its replacement has taken its name."""


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """Save ``model`` and ``tokenizer`` to ``path`` atomically; returns the path. Raises
    ``NonFiniteWeightsError``, writing nothing, when a weight is NaN or inf."""
    check_finite_weights(model)
    return write_atomically(Path(path), lambda tmp: save_weights(model, tokenizer, tmp))


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise ``NonFiniteWeightsError`` naming the first tensor of ``model``'s state dict
    that holds NaN or inf (one pass over the weights, cheap beside writing them)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeightsError(
                f"{name} holds NaN or inf values: refusing to save non-finite weights; the "
                "last checkpoint saved before is the last good one"
            )


def save_weights(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """Write ``model`` (Hugging Face format, its own dtype) and ``tokenizer`` into
    ``directory``; a model with LoRA adapters is written merged, its adapter in
    ``adapter/`` (``adapters.save_merged``)."""
    if is_adapted(model):
        save_merged(model, directory)
    else:
        model.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh ``<path>.partial`` directory, make it durable and give
    its files the umask's permissions, then rename it to ``path`` (replacing one there)."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    mode = 0o666 & ~_umask()
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        os.chmod(file, mode)
        fsync_path(file)
    fsync_path(tmp)
    replaced = path.with_name(path.name + OLD_SUFFIX)
    if path.exists():  # moved aside first: a rename is instant, a delete is not
        shutil.rmtree(replaced, ignore_errors=True)
        path.rename(replaced)
    tmp.rename(path)
    fsync_path(path.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return path


def _umask() -> int:
    """The process's umask, read from ``/proc`` (setting it and back would race other
    threads creating files meanwhile); 0o022 where ``/proc`` does not say."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        return 0o022
