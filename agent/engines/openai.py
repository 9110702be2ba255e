"""An engine over any OpenAI-compatible completions server that speaks token ids.

``OpenAIEngine`` sends prompts as token ids to ``POST /v1/completions`` and reads back the
sampled token ids (``return_token_ids``) with their logprobs: nothing is re-tokenized. A
``vllm serve`` process, local or remote, is the intended server. A server that returns no
token ids is refused with an error that says so, because training on re-tokenized text is
exactly the drift palaestra exists to avoid.

Transport: one pooled ``httpx.AsyncClient``; every request has a timeout; connection
errors, 429 and 5xx answers are retried with exponential backoff; when retries run out the
request fails with ``EngineError``, which the rollout records as an infrastructure failure
(never as reward 0).

Weights: ``update_weights`` writes the tensors to a safetensors file and asks the server to
reload them through ``/collective_rpc`` (vLLM's dev-mode route) with the worker extension in
``palaestra.agent.engines.vllm_worker``, then clears the server's prefix cache
(``/reset_prefix_cache``), whose keys and values were computed with the old weights. The
file must be readable by the server: the default directory, ``/dev/shm``, works for a
server on the same machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from palaestra.agent.engines.base import Completion, SamplingParams, WeightGate
from palaestra.agent.engines.vllm_worker import default_weights_dir, write_weights_file
from palaestra.agent.errors import EngineError

if TYPE_CHECKING:
    import torch

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth retrying: timeouts, rate limits and server-side failures."""

_DEV_ROUTES = ("/collective_rpc", "/reset_prefix_cache")
"""Routes a vLLM server has only in dev mode; weight updates need both."""
SERVER_SETUP = (
    "start the server with VLLM_SERVER_DEV_MODE=1 and "
    "--worker-extension-cls palaestra.agent.engines.vllm_worker.WeightReloadExtension"
)


class OpenAIEngine:
    """Samples from a remote OpenAI-compatible server, token ids in and out."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        stop_token_ids: Iterable[int] = (),
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_connections: int = 64,
        weights_dir: str | Path | None = None,
        dtype: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Args:
        base_url: the server root, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added).
        model: the model name the server serves.
        stop_token_ids: ids that end a turn (sent with every request).
        timeout_s: per-request timeout; a request that exceeds it is retried.
        max_retries: retries after the first attempt, with delays ``backoff_s * 2**i``.
        max_connections: size of the connection pool (concurrent requests).
        weights_dir: where ``update_weights`` writes its file; default ``/dev/shm``.
        dtype: the server's weight dtype (``bfloat16``, ``float32``); updates are cast to it
            before they are sent. ``None`` sends them as they are.
        transport: an httpx transport to use instead of the network (``httpx.MockTransport``
            in tests).
        """
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.stop_token_ids = list(stop_token_ids)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.weights_dir = Path(weights_dir) if weights_dir else default_weights_dir()
        self.dtype = dtype
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )
        self._gate = WeightGate()

    @property
    def policy_version(self) -> int:
        """Version of the weights last sent to the server; 0 for the weights it started with."""
        return self._gate.version

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion:
        """Sample one completion; raises ``EngineError`` when the server fails or lacks token ids."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(prompt_ids),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "stop_token_ids": self.stop_token_ids,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        async with self._gate.serving() as version:
            choice = (await self._post("/v1/completions", body))["choices"][0]
        token_ids = choice.get("token_ids")
        if token_ids is None:
            raise EngineError(
                f"the server at {self.base_url} returned no token ids; palaestra trains on the "
                "exact sampled ids, so it needs a server that supports `return_token_ids` "
                "(vLLM 0.10 or newer)"
            )
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if logprobs is None or len(logprobs) != len(token_ids):
            raise EngineError(
                f"the server at {self.base_url} returned {0 if logprobs is None else len(logprobs)}"
                f" logprobs for {len(token_ids)} tokens; it must return one per sampled token"
            )
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(tuple(token_ids), tuple(float(x) for x in logprobs), finish, version)

    async def score(self, token_ids: list[int]) -> list[float]:
        """Logprob of each of ``token_ids[1:]`` under the server's weights, at temperature 1.

        Uses vLLM's ``prompt_logprobs`` extension; raises ``EngineError`` when the server
        returns none.
        """
        body = {"model": self.model, "prompt": list(token_ids), "max_tokens": 1}
        async with self._gate.serving():
            reply = await self._post("/v1/completions", {**body, "prompt_logprobs": 0})
        choice = reply["choices"][0]
        positions = choice.get("prompt_logprobs")
        if positions is None or len(positions) != len(token_ids):
            raise EngineError(
                f"the server at {self.base_url} returned no prompt logprobs for the "
                f"{len(token_ids)} tokens to score; scoring needs vLLM's `prompt_logprobs`"
            )
        return [float(positions[i][str(t)]["logprob"]) for i, t in enumerate(token_ids) if i]

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Send new weights through a shared file; the server reloads them in place.

        This engine's new requests wait while the server loads, and its requests in flight
        finish first, so every completion comes from one version (requests other clients
        send to the same server are not held back).
        """
        async with self._gate.loading(version):
            path = await asyncio.to_thread(
                write_weights_file, named_tensors, self.weights_dir, dtype=self.dtype
            )
            try:
                await self._post(
                    "/collective_rpc", {"method": "palaestra_reload_weights", "args": [str(path)]}
                )
            finally:
                path.unlink(missing_ok=True)
            # cached prompt prefixes hold keys and values computed with the old weights
            reset = await self._post("/reset_prefix_cache", {})
            if not reset.get("success", False):
                raise EngineError(
                    f"{self.base_url} could not clear its prefix cache after a weight update; "
                    "later completions would reuse keys and values of the old weights"
                )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on transport errors and retryable statuses."""
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._client.post(route, json=body)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 404 and route in _DEV_ROUTES:
                    raise EngineError(f"{self.base_url} has no {route} route: {SERVER_SETUP}")
                if response.status_code < 400:
                    result: dict[str, Any] = response.json()
                    return result
                failure = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in RETRY_STATUS:
                    raise EngineError(f"{self.base_url}{route} refused the request: {failure}")
            if attempt < self.max_retries:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        raise EngineError(
            f"{self.base_url}{route} failed after {self.max_retries + 1} attempts: {failure}"
        )
