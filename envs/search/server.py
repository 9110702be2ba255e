"""The retrieval server: one BM25 index served over HTTP (aiohttp) to every rollout worker.

::

    palaestra search serve --index DIR [--host 127.0.0.1 --port 8000]

Routes:

- ``POST /search`` with ``{"query": str, "k": int}`` (``k`` optional, default 5, at most
  ``MAX_K``) → ``{"documents": [{"id", "title", "text", "score"}, ...]}``, best first:
  the same documents ``BM25Retriever.search`` gives in-process. A malformed request
  gets ``400 {"error": "..."}`` saying what to fix.
- ``GET /health`` → ``{"status": "ok", "documents": N}``.

Concurrent requests are read and answered by one event loop, and each search is scored in
the loop itself: scoring is CPU-bound and holds the GIL, so handing it to worker threads
only added overhead (measured on 2 cores: 1,300 against 2,100 queries/s). A missing index
fails at start-up with ``IndexNotFoundError``, before the port is bound.

What this module does not do: authentication, TLS, reloading the index while serving, or
using more than one core (run several servers behind a load balancer for that).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from palaestra.envs.search.retrieval import BM25Retriever, RetrievalError, check_search_request

DEFAULT_K = 5
"""Documents returned when a request gives no ``k``."""

_RETRIEVER = web.AppKey("retriever", BM25Retriever)


def make_app(retriever: BM25Retriever) -> web.Application:
    """The aiohttp application serving ``retriever``."""
    app = web.Application()
    app[_RETRIEVER] = retriever
    app.router.add_post("/search", _search)
    app.router.add_get("/health", _health)
    return app


async def _search(request: web.Request) -> web.Response:
    try:
        query, k = _parse_search(await request.text())
    except RetrievalError as error:
        return web.json_response({"error": str(error)}, status=400)
    documents = request.app[_RETRIEVER].search_now(query, k)
    return web.json_response({"documents": [d.to_json() for d in documents]})


def _parse_search(body: str) -> tuple[str, int]:
    example = '{"query": "river Orvane", "k": 5}'
    try:
        payload: Any = json.loads(body)
    except json.JSONDecodeError as error:
        raise RetrievalError(f"the body must be JSON such as {example} ({error.msg}).") from None
    if not isinstance(payload, dict):
        raise RetrievalError(f"the body must be a JSON object such as {example}.")
    unknown = sorted(set(payload) - {"query", "k"})
    if unknown:
        raise RetrievalError(f"unknown field(s) {unknown}; a request has 'query' and 'k'.")
    return check_search_request(payload.get("query"), payload.get("k", DEFAULT_K))


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "documents": len(request.app[_RETRIEVER].documents)})


@asynccontextmanager
async def serving(
    retriever: BM25Retriever, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``retriever`` on ``host:port`` (0: a free port) while the block runs; yields
    the server's URL."""
    runner = web.AppRunner(make_app(retriever), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()
