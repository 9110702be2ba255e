"""Checkpoints in Hugging Face format, loadable with ``from_pretrained``.

A checkpoint is a directory with the model's config, safetensors weights, generation
config and tokenizer files, written to a temporary sibling and renamed into place so an
interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """Save ``model`` and ``tokenizer`` to ``path`` atomically; returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # type: ignore[operator]
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
