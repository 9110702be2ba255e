"""``HttpRetriever``: the client of a retrieval server (``server.py``), with timeouts and retries.

Each request has a time limit; a request that fails for the server's reasons (it cannot be
reached, the connection drops, a timeout, a 5xx answer) is retried after a growing pause,
and when the retries are used up ``RetrieverUnavailableError`` is raised. That error is a
``ToolInfraError``: a search tool that lets it through ends its episode as an
infrastructure failure, which the trainer keeps out of the gradient. A 4xx answer (a
request the server refuses) raises ``RetrievalError`` with the server's reason, at once.

The client keeps one pooled ``httpx.AsyncClient`` per event loop, so the same retriever
works from the rollout's loop and from the fresh loops that a sync ``env.step`` runs async
tools in.

What this module does not do: load balancing over several servers, or caching.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import httpx

from palaestra.envs.search.retrieval import (
    Document,
    RetrievalError,
    RetrieverUnavailableError,
    check_search_request,
)


class HttpRetriever:
    """A ``Retriever`` that asks a retrieval server at ``url``."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        max_connections: int = 100,
    ) -> None:
        """Args:
        url: the server's base URL, e.g. ``"http://127.0.0.1:8000"``.
        timeout_s: seconds one request may take (connecting, sending, reading).
        retries: further attempts after a failed one; the pause doubles from ``backoff_s``.
        backoff_s: seconds before the first retry.
        max_connections: pooled connections per event loop.
        """
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_connections < 1:
            raise RetrievalError(
                "HttpRetriever needs timeout_s > 0, retries >= 0, backoff_s >= 0 and "
                f"max_connections >= 1; got {timeout_s}, {retries}, {backoff_s}, {max_connections}."
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_connections = max_connections
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._clients = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"HttpRetriever({self.url!r})"

    async def search(self, query: str, k: int) -> list[Document]:
        """At most ``k`` documents for ``query`` from the server, best first."""
        payload = dict(zip(("query", "k"), check_search_request(query, k), strict=True))
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._client().post("/search", json=payload)
            except httpx.TransportError as error:
                failure = f"{type(error).__name__}: {error}"
                continue
            if response.status_code == 200:
                return [Document(**d) for d in response.json()["documents"]]
            if response.status_code < 500:
                raise RetrievalError(f"{self.url} refused the search: {_reason(response)}")
            failure = f"HTTP {response.status_code}: {_reason(response)}"
        raise RetrieverUnavailableError(
            f"the retrieval server {self.url} failed {self.retries + 1} attempt(s); last: "
            f"{failure or 'no answer'}"
        )

    async def aclose(self) -> None:
        """Close the connections of the running event loop's client."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            limits = httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_connections,
            )
            client = httpx.AsyncClient(
                base_url=self.url, timeout=self.timeout_s, limits=limits, trust_env=False
            )
            self._clients[loop] = client
        return client


def _reason(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)[:200]
