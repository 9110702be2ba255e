"""Engines: token ids in, sampled token ids and their logprobs out.

- ``base``: the ``Engine`` protocol and its records, ``SamplingParams`` and ``Completion``.
- ``transformers``: ``TransformersEngine``, a local Hugging Face model with batching.
- ``fake``: ``FakeEngine``, scripted completions for tests and for users without a model.

``TransformersEngine`` is imported on first use, so code that only needs the protocol or
the fake does not pay for importing torch and transformers (~2 s).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from palaestra.agent.engines.base import Completion, Engine, SamplingParams
from palaestra.agent.engines.fake import FakeEngine

if TYPE_CHECKING:
    from palaestra.agent.engines.transformers import TransformersEngine

__all__ = ["Completion", "Engine", "FakeEngine", "SamplingParams", "TransformersEngine"]


def __getattr__(name: str) -> Any:
    if name == "TransformersEngine":
        from palaestra.agent.engines.transformers import TransformersEngine

        return TransformersEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
