"""The engine contract: token ids in, token ids and logprobs out.

An engine samples completions for prompts given as token ids and returns the sampled ids
with the logprob of each under the weights it sampled with. It never tokenizes: the chat
renderer owns text-to-token conversion, so what the trainer sees is what was sampled.

``update_weights`` is the only edge from trainer back to rollout: it loads new weights and
stamps them with a policy version that every later completion carries. ``score`` gives the
logprobs of a given sequence under the loaded weights, so a trainer can check that the
weights it sent are the ones the engine samples with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from palaestra.agent.errors import EngineError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion."""

    max_tokens: int = 256
    """Most new tokens to sample; the completion ends with finish reason ``length`` there."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    seed: int | None = None
    """Seed for this request's sampling; ``None`` draws from the engine's generator."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    """What the engine sampled for one prompt."""

    token_ids: tuple[int, ...]
    """Sampled ids, including the end-of-turn token when the model emitted one."""
    logprobs: tuple[float, ...]
    """Logprob of each sampled id under the sampling distribution: logits divided by the
    temperature (1 when greedy), before top-p truncation. The learner scores with the same
    temperature so the two agree."""
    finish_reason: str
    """``"stop"`` when an end token was sampled, ``"length"`` when ``max_tokens`` was hit."""
    policy_version: int
    """The weight version that produced this completion."""


def check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    """Refuse empty id lists and ids outside ``[0, vocab_size)`` with an ``EngineError``.

    Engines call this per request, before batching, so one bad request cannot fail others.
    """
    if not token_ids:
        raise EngineError("token ids are empty: render at least one token to prompt with")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise EngineError(
            f"{len(bad)} ids lie outside the vocabulary [0, {vocab_size}) (first: {bad[0]}): "
            "were they tokenized for another model?"
        )


class WeightGate:
    """Keeps requests and weight loads apart, so each completion has exactly one version.

    Requests enter through ``serving``; a load through ``loading`` stops new requests,
    waits for those in flight to finish on the old weights, and lets requests go again
    once the new weights are in. Use from one event loop.
    """

    def __init__(self) -> None:
        self.version = 0
        """Version of the weights requests now run on."""
        self._in_flight = 0
        self._loading = False
        self._condition: asyncio.Condition | None = None  # made on first use, in the loop

    def _gate(self) -> asyncio.Condition:
        if self._condition is None:
            self._condition = asyncio.Condition()
        return self._condition

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        """Hold off weight loads while a request runs; yield the version it runs on."""
        gate = self._gate()
        async with gate:
            await gate.wait_for(lambda: not self._loading)
            self._in_flight += 1
        try:
            yield self.version
        finally:
            async with gate:
                self._in_flight -= 1
                gate.notify_all()

    @contextlib.asynccontextmanager
    async def loading(self, version: int) -> AsyncIterator[None]:
        """Stop new requests and wait for those in flight; stamp ``version`` if the load
        succeeds, and let requests go again either way."""
        gate = self._gate()
        async with gate:
            await gate.wait_for(lambda: not self._loading)
            self._loading = True
            await gate.wait_for(lambda: self._in_flight == 0)
        try:
            yield
            self.version = version
        finally:
            async with gate:
                self._loading = False
                gate.notify_all()


@runtime_checkable
class Engine(Protocol):
    """Anything that samples completions from token ids and takes weight updates."""

    @property
    def policy_version(self) -> int:
        """Version of the weights now loaded; 0 for the initial weights."""
        ...

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion:
        """Sample one completion for ``prompt_ids``; concurrent calls may be batched."""
        ...

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load new weights (names as in the HF state dict) and stamp them ``version``."""
        ...

    async def score(self, token_ids: list[int]) -> list[float]:
        """Logprob of each of ``token_ids[1:]`` given the tokens before it, at temperature 1."""
        ...
