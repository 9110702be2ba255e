"""A vLLM worker extension that reloads weights from a safetensors file.

Start a vLLM server with::

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL \
        --worker-extension-cls palaestra.agent.engines.vllm_worker.WeightReloadExtension

and ``POST /collective_rpc {"method": "palaestra_reload_weights", "args": [PATH]}`` makes every
worker reload its weights in place from ``PATH`` (a file the server can read: ``/dev/shm``
on the same machine, shared storage otherwise). ``OpenAIEngine.update_weights`` does this.

``reload_weights(is_checkpoint_format=True)`` is used rather than ``model.load_weights``:
it loads checkpoint-format tensors and redoes the processing done after the first load
(on CPU, vLLM repacks linear weights, and a plain load into repacked parameters fails).

This module runs inside vLLM's worker processes; it imports vLLM nothing at import time.
"""

from __future__ import annotations

from typing import Any


class WeightReloadExtension:
    """Mixed into vLLM's worker class; adds ``palaestra_reload_weights``."""

    def palaestra_reload_weights(self: Any, path: str) -> dict[str, int]:
        """Reload every weight from the safetensors file at ``path``; returns the tensor count."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return {"tensors": len(weights)}
