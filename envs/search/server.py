"""The retrieval server: one BM25 index served over HTTP (aiohttp) to every rollout worker.

::

    palaestra search serve --index DIR [--host 127.0.0.1 --port 8000]
                                       [--timeout-s 5 --max-connections 200]

Routes:

- ``POST /search`` with ``{"query": str, "k": int}`` (``k`` optional, default 5, at most
  ``MAX_K``) → ``{"documents": [{"id", "title", "text", "score"}, ...]}``, best first:
  the same documents ``BM25Retriever.search`` gives in-process. A malformed request (not
  UTF-8, not JSON, nested deeper than Python's recursion limit, a number past Python's
  int-string conversion limit, a wrong field) gets ``400 {"error": "..."}`` saying what to
  fix; a body over ``MAX_BODY_BYTES`` gets 413, and one that does not arrive within the
  timeout gets 408.
- ``GET /health`` → ``{"status": "ok", "documents": N}``.

Concurrent requests are read and answered by one event loop, and each search is scored in
the loop itself: scoring is CPU-bound and holds the GIL, so handing it to worker threads
only added overhead (measured on 2 cores: 1,300 against 2,100 queries/s). A missing index
fails at start-up with ``IndexNotFoundError``, before the port is bound; a port that
cannot be bound raises ``ServerStartError``.

Slow and idle clients: a client has ``timeout_s`` to send a request's headers, counted
from its connection or from its last answer (so an idle connection is closed after that
long), and ``timeout_s`` more for the body, else it gets 408 and, once aiohttp has read
what is still on its way for up to ``timeout_s`` (so that the client sees the 408), a
closed connection. At most ``max_connections`` connections are open at once; one beyond
that is closed as soon as it is accepted. So a client that sends half a request holds a
slot for at most three times ``timeout_s``, never more descriptors than the cap, and
``/health`` answers again once the slow ones are dropped.

What this module does not do: authentication, TLS, reloading the index while serving,
using more than one core (run several servers behind a load balancer for that), or
telling a slow client from a hostile one (a client that keeps reconnecting can keep the
slots full).
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from typing import Any

from aiohttp import web

from palaestra.envs.errors import EnvError
from palaestra.envs.search.retrieval import BM25Retriever, RetrievalError, check_search_request

DEFAULT_K = 5
"""Documents returned when a request gives no ``k``."""

DEFAULT_TIMEOUT_S = 5.0
"""Seconds a client may take to send a request's headers, and then its body, or sit idle
between requests, before its connection is closed."""

DEFAULT_MAX_CONNECTIONS = 200
"""Connections served at once: above ``HttpRetriever``'s 100 pooled connections per event
loop, below a 256-descriptor limit with room for the index and the listening socket."""

MAX_BODY_BYTES = 64 * 1024
"""The largest ``/search`` body served; a search request is a query and a number."""

_EXAMPLE = '{"query": "river Orvane", "k": 5}'
_RETRIEVER = web.AppKey("retriever", BM25Retriever)
_TIMEOUT_S = web.AppKey("timeout_s", float)


class ServerStartError(EnvError):
    """The retrieval server cannot start: its address cannot be bound (the port is taken,
    say) or a limit is out of range."""


def make_app(retriever: BM25Retriever, timeout_s: float = DEFAULT_TIMEOUT_S) -> web.Application:
    """The aiohttp application serving ``retriever``; a ``/search`` body must arrive
    within ``timeout_s``."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_RETRIEVER] = retriever
    app[_TIMEOUT_S] = timeout_s
    app.router.add_post("/search", _search)
    app.router.add_get("/health", _health)
    return app


async def _search(request: web.Request) -> web.Response:
    timeout_s = request.app[_TIMEOUT_S]
    try:
        query, k = _parse_search(await asyncio.wait_for(request.read(), timeout_s))
    except asyncio.TimeoutError:
        response = _error(408, f"the body did not arrive within {timeout_s:g} s.")
        response.force_close()
        return response
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"the body is over {MAX_BODY_BYTES} bytes; send {_EXAMPLE}.")
    except (web.RequestPayloadError, ConnectionResetError):  # garbled, or the client left
        return _error(400, "the body cannot be read; check its Content-Encoding.")
    except RetrievalError as error:
        return _error(400, str(error))
    documents = request.app[_RETRIEVER].search_now(query, k)
    return web.json_response({"documents": [d.to_json() for d in documents]})


def _parse_search(body: bytes) -> tuple[str, int]:
    try:
        payload: Any = json.loads(body.decode("utf-8"))
        if not isinstance(payload, dict):
            raise RetrievalError(f"the body must be a JSON object such as {_EXAMPLE}.")
        unknown = sorted(set(payload) - {"query", "k"})
        if unknown:
            raise RetrievalError(f"unknown field(s) {unknown}; a request has 'query' and 'k'.")
        return check_search_request(payload.get("query"), payload.get("k", DEFAULT_K))
    except UnicodeDecodeError:
        raise RetrievalError("the body must be UTF-8 text.") from None
    except json.JSONDecodeError as error:
        raise RetrievalError(f"the body must be JSON such as {_EXAMPLE} ({error.msg}).") from None
    except ValueError:  # an integer past Python's int-string conversion limit
        raise RetrievalError("the body holds a number with too many digits.") from None
    except RecursionError:  # in decoding, or in quoting a deep value in the error
        raise RetrievalError(f"the body nests too deeply; send {_EXAMPLE}.") from None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "documents": len(request.app[_RETRIEVER].documents)})


@asynccontextmanager
async def serving(
    retriever: BM25Retriever,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> AsyncIterator[str]:
    """Serve ``retriever`` on ``host:port`` (0: a free port) while the block runs; yields
    the server's URL.

    A connection is closed when its client takes over ``timeout_s`` seconds to send a
    request's headers or its body, or sits idle that long; one accepted while
    ``max_connections`` are open is closed at once. ``ServerStartError`` if a limit is out
    of range or the address cannot be bound.
    """
    if timeout_s <= 0 or max_connections < 1:
        raise ServerStartError(
            f"the retrieval server needs timeout_s > 0 and max_connections >= 1; got "
            f"{timeout_s} and {max_connections}."
        )
    runner = web.AppRunner(
        make_app(retriever, timeout_s),
        access_log=None,
        # aiohttp (>= 3.14.4) starts the keep-alive timer at the connection: it bounds the
        # wait for a request's headers as well as the idle time between requests.
        keepalive_timeout=timeout_s,
        lingering_time=timeout_s,  # reading the rest of a refused body before closing
    )
    await runner.setup()
    try:
        assert runner.server is not None  # set by setup()
        with closing(await _listen(runner.server, host, port, max_connections)) as listener:
            bound_host, bound_port = listener.sockets[0].getsockname()[:2]
            yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()


async def _listen(http: web.Server, host: str, port: int, max_connections: int) -> asyncio.Server:
    """A socket listening on ``host:port`` that hands each connection to ``http`` while
    fewer than ``max_connections`` are open, and closes it otherwise."""

    def connection() -> asyncio.BaseProtocol:
        return http() if len(http.connections) < max_connections else _Refused()

    try:
        return await asyncio.get_running_loop().create_server(connection, host, port)
    except OSError as error:
        reason = "the port is in use" if error.errno == errno.EADDRINUSE else error.strerror
        raise ServerStartError(
            f"cannot listen on {host}:{port} ({reason}); choose another --port "
            "(0: any free port) or --host."
        ) from None


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
