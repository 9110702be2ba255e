"""A scripted engine, for tests and for users without a model.

``FakeEngine`` answers each ``generate`` call with the next scripted completion (or with
what a function of the prompt returns), with fixed logprobs, and records what it was
asked, so a rollout or a trainer can be tested without torch weights, a GPU or a network.
It samples nothing and needs no tokenizer.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from palaestra.agent.engines.base import Completion, SamplingParams
from palaestra.agent.errors import EngineError

if TYPE_CHECKING:
    import torch

Script = Callable[[list[int]], Sequence[int]] | Iterable[Sequence[int]]
"""A function from prompt ids to completion ids, or completion ids served in order."""
Logprobs = float | Callable[[list[int], list[int]], Sequence[float]]
"""One logprob for every token, or a function of (prompt ids, completion ids)."""


class FakeEngine:
    """Serves scripted completions through the ``Engine`` protocol.

    A scripted completion longer than ``sampling.max_tokens`` is cut there and finishes
    with ``"length"``; any other finishes with ``"stop"`` (script the end-of-turn id
    yourself where the caller looks for it).
    """

    def __init__(self, script: Script, *, logprobs: Logprobs = -1.0) -> None:
        self._complete = script if callable(script) else _in_order(list(script))
        self._logprobs = logprobs
        self._policy_version = 0
        self.prompts: list[list[int]] = []
        """Every prompt received, in order."""
        self.sampling: list[SamplingParams] = []
        """The sampling parameters of every request, in order."""
        self.weight_updates: list[tuple[int, list[str]]] = []
        """``(version, tensor names)`` of every ``update_weights`` call, in order."""

    @property
    def policy_version(self) -> int:
        """The version of the last ``update_weights``; 0 before any."""
        return self._policy_version

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion:
        """Record the request and return the next scripted completion."""
        await asyncio.sleep(0)  # let concurrent callers interleave as with a real engine
        prompt = list(prompt_ids)
        self.prompts.append(prompt)
        self.sampling.append(sampling)
        token_ids = list(self._complete(prompt))
        finish_reason = "length" if len(token_ids) > sampling.max_tokens else "stop"
        token_ids = token_ids[: sampling.max_tokens]
        if callable(self._logprobs):
            logprobs = list(self._logprobs(prompt, token_ids))
            if len(logprobs) != len(token_ids):
                raise EngineError(
                    f"FakeEngine's logprobs function gave {len(logprobs)} values for "
                    f"{len(token_ids)} tokens"
                )
        else:
            logprobs = [self._logprobs] * len(token_ids)
        return Completion(tuple(token_ids), tuple(logprobs), finish_reason, self._policy_version)

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Record the tensor names and take ``version``; the tensors are not kept."""
        self.weight_updates.append((version, [name for name, _ in named_tensors]))
        self._policy_version = version

    async def score(self, token_ids: list[int]) -> list[float]:
        """The scripted logprobs of ``token_ids[1:]``, as if sampled after ``token_ids[:1]``."""
        prompt, rest = list(token_ids[:1]), list(token_ids[1:])
        if callable(self._logprobs):
            return list(self._logprobs(prompt, rest))
        return [self._logprobs] * len(rest)


def _in_order(scripted: list[Sequence[int]]) -> Callable[[list[int]], Sequence[int]]:
    """Serve the scripted completions one per call, whatever the prompt."""
    remaining = collections.deque(scripted)

    def complete(prompt_ids: list[int]) -> Sequence[int]:
        if not remaining:
            raise EngineError(
                f"FakeEngine's script ran out after {len(scripted)} completions: "
                "script one completion per generate call"
            )
        return remaining.popleft()

    return complete
