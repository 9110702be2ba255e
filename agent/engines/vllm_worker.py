"""Weights for vLLM through a safetensors file: written by the trainer, reloaded by the worker.

``write_weights_file`` saves a state dict for the worker to read; ``WeightReloadExtension``
is the worker's side. Both ``VLLMEngine`` (vLLM in process) and ``OpenAIEngine`` (a
``vllm serve`` process) use them.

Start a vLLM server with::

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \
        --worker-extension-cls palaestra.agent.engines.vllm_worker.WeightReloadExtension

and ``POST /collective_rpc {"method": "palaestra_reload_weights", "args": [PATH]}`` makes every
worker reload its weights in place from ``PATH`` (a file the server can read: ``/dev/shm``
on the same machine, shared storage otherwise). ``OpenAIEngine.update_weights`` does this.

``reload_weights(is_checkpoint_format=True)`` is used rather than ``model.load_weights``:
it loads checkpoint-format tensors and redoes the processing done after the first load
(on CPU, vLLM repacks linear weights, and a plain load into repacked parameters fails).
Send every tensor of the state dict, a tied ``lm_head.weight`` included: on CPU the output
layer keeps its own packed copy of the tied embedding, which is rebuilt only when a weight
is loaded under its name; without it the engine samples from the old output layer.

The extension runs inside vLLM's worker processes; this module imports no vLLM.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def default_weights_dir() -> Path:
    """``/dev/shm`` (memory, no disk) where there is one, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def write_weights_file(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    directory: Path | None = None,
    *,
    dtype: str | None = None,
) -> Path:
    """Save tensors, moved to the CPU, to a fresh safetensors file in ``directory``.

    With ``dtype`` (``"bfloat16"``, ``"float32"``), floating-point tensors are cast to it
    first: the engine's own dtype, so the worker loads them without converting (and a
    bfloat16 engine reads half the bytes). safetensors refuses tensors that share storage
    (tied embeddings): any tensor whose storage was already written is cloned; the others
    are written without a copy.
    """
    import torch
    from safetensors.torch import save_file

    target = getattr(torch, dtype) if dtype else None
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in named_tensors:
        cast = target if target is not None and tensor.is_floating_point() else tensor.dtype
        cpu = tensor.detach().to("cpu", dtype=cast).contiguous()
        if cpu.untyped_storage().data_ptr() in storages:
            cpu = cpu.clone()
        storages.add(cpu.untyped_storage().data_ptr())
        tensors[name] = cpu
    fd, name = tempfile.mkstemp(
        prefix="palaestra-weights-", suffix=".safetensors", dir=directory or default_weights_dir()
    )
    os.close(fd)
    save_file(tensors, name)
    return Path(name)


class WeightReloadExtension:
    """Mixed into vLLM's worker class; adds ``palaestra_reload_weights``."""

    def palaestra_reload_weights(self: Any, path: str) -> dict[str, int]:
        """Reload every weight from the safetensors file at ``path``; returns the tensor count."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return {"tensors": len(weights)}
