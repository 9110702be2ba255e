"""Build the engine a run asks for by name, and shut it down after.

``build_engine`` is the one place that maps an engine name (``transformers``, ``vllm``,
``openai``) to a started engine, so the training stages and ``palaestra eval`` start
engines the same way. ``close_engine`` releases what an engine holds (vLLM's processes,
an HTTP connection pool); ``engine_metrics`` is what an engine reports for a run's log.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from palaestra.agent.engines.base import Engine

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ENGINES = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class ServerSettings:
    """Where and how to reach an OpenAI-compatible server (``engine = "openai"``)."""

    url: str
    """Server root, e.g. ``http://127.0.0.1:8000``."""
    model_name: str
    """The model name the server serves."""
    api_key: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 3


def build_engine(
    kind: str,
    *,
    model: PreTrainedModel,
    model_dir: str | os.PathLike[str],
    eos_token_ids: Iterable[int],
    pad_token_id: int | None,
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    max_batch_size: int = 64,
    server: ServerSettings | None = None,
) -> Engine:
    """Start an engine of ``kind`` on the policy's weights.

    ``transformers`` samples with ``model`` itself (pass a copy to keep it apart from a
    model being trained); ``vllm`` loads the weights of ``model_dir``; ``openai`` talks to
    ``server``, which must already serve the same weights in ``dtype``. Raises
    ``ValueError`` for an unknown kind or an ``openai`` engine without ``server``.
    """
    from palaestra.models import resolve_dtype

    dtype = resolve_dtype(dtype, device)
    eos_token_ids = sorted(eos_token_ids)
    if not eos_token_ids:
        raise ValueError("eos_token_ids is empty: pass the id(s) that end a turn")
    if kind == "transformers":
        from palaestra.agent.engines.transformers import TransformersEngine

        return TransformersEngine(
            model,
            eos_token_ids=eos_token_ids,
            # padding is masked out; an end token serves when the tokenizer names no pad
            pad_token_id=eos_token_ids[0] if pad_token_id is None else pad_token_id,
            max_batch_size=max_batch_size,
            device=device,
            dtype=dtype,
            seed=seed,
        )
    if kind == "vllm":
        from palaestra.agent.engines.vllm import VLLMEngine

        return VLLMEngine.from_model_dir(
            Path(model_dir), eos_token_ids=eos_token_ids, dtype=dtype, seed=seed
        )
    if kind == "openai":
        from palaestra.agent.engines.openai import OpenAIEngine

        if server is None:
            raise ValueError("the openai engine needs server settings (url and model name)")
        return OpenAIEngine(
            server.url,
            server.model_name,
            stop_token_ids=eos_token_ids,
            api_key=server.api_key,
            timeout_s=server.timeout_s,
            max_retries=server.max_retries,
            dtype=dtype,
        )
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")


async def close_engine(engine: Engine) -> None:
    """Release the engine's processes or connections; engines that hold none are left be."""
    close = getattr(engine, "close", None)
    if callable(close):  # VLLMEngine: its processes
        close()
    aclose = getattr(engine, "aclose", None)
    if callable(aclose):  # OpenAIEngine: its connection pool
        await aclose()


def engine_metrics(engine: Engine) -> dict[str, float]:
    """What an engine reports for a run's log: ``engine/restarts``, the times a vLLM engine
    started its process again after it died (other engines report nothing)."""
    restarts = getattr(engine, "restarts", None)  # VLLMEngine
    return {} if restarts is None else {"engine/restarts": float(restarts)}
