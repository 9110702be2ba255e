"""Engines: token ids in, sampled token ids and their logprobs out.

- ``base``: the ``Engine`` protocol and its records, ``SamplingParams`` and ``Completion``.
- ``transformers``: ``TransformersEngine``, a local Hugging Face model with batching.
- ``vllm``: ``VLLMEngine``, vLLM's async engine in its own processes (CUDA or CPU).
- ``fake``: ``FakeEngine``, scripted completions for tests and for users without a model.

``TransformersEngine`` and ``VLLMEngine`` are imported on first use, so code that only
needs the protocol or the fake does not pay for importing torch and transformers (~2 s);
vLLM itself is imported only when a ``VLLMEngine`` starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from palaestra.agent.engines.base import Completion, Engine, SamplingParams
from palaestra.agent.engines.fake import FakeEngine

if TYPE_CHECKING:
    from palaestra.agent.engines.transformers import TransformersEngine
    from palaestra.agent.engines.vllm import VLLMEngine

__all__ = [
    "Completion",
    "Engine",
    "FakeEngine",
    "SamplingParams",
    "TransformersEngine",
    "VLLMEngine",
]


def __getattr__(name: str) -> Any:
    if name == "TransformersEngine":
        from palaestra.agent.engines.transformers import TransformersEngine

        return TransformersEngine
    if name == "VLLMEngine":
        from palaestra.agent.engines.vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
