"""The retrieval server over real loopback sockets: same answers as in-process, request
validation, slow clients dropped, a busy port refused, and a dead or killed server
reported as an infrastructure failure."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import subprocess
import sys
import warnings

import httpx
import pytest

from palaestra.envs.search import (
    BM25Retriever,
    Encyclopedia,
    HttpRetriever,
    RetrieverUnavailableError,
    SearchEnv,
)
from palaestra.envs.search.server import serving


@pytest.fixture(scope="module")
def world() -> Encyclopedia:
    return Encyclopedia.generate(0)


@pytest.fixture(scope="module")
def retriever(world) -> BM25Retriever:
    return BM25Retriever.build(world.documents)


def search_call(query: str) -> str:
    return f"<tool_call>\n{json.dumps({'name': 'search', 'arguments': {'query': query}})}\n</tool_call>"


async def test_200_concurrent_queries_get_the_in_process_results(world, retriever):
    queries = [q.question for q in world.questions[::5]][:200]
    assert len(queries) == 200
    async with serving(retriever) as url:
        client = HttpRetriever(url)
        remote = await asyncio.gather(*(client.search(q, 5) for q in queries))
        await client.aclose()
    local = [retriever.search_now(q, 5) for q in queries]
    assert remote == local  # same ids, order, text and scores
    assert all(remote)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "the body must be JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"k": 3}', 400, "'query' must be a non-empty string"),
        (b'{"query": 3}', 400, "'query' must be a non-empty string"),
        (b'{"query": "Orvane", "k": 0}', 400, "'k' must be an integer from 1 to 100"),
        (b'{"query": "Orvane", "k": "5"}', 400, "'k' must be an integer from 1 to 100"),
        (b'{"query": "Orvane", "k": true}', 400, "'k' must be an integer from 1 to 100"),
        (b'{"query": "Orvane", "top": 3}', 400, "unknown field(s) ['top']"),
        (b'{"query": "Orvane \xff"}', 400, "must be UTF-8"),
        (b'{"query": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nests too deeply"),
        (b'{"query": "Orvane", "k": ' + b"9" * 5000 + b"}", 400, "too many digits"),
        (b'{"query": "' + b"a" * 100_000 + b'"}', 413, "over 65536 bytes"),
    ],
)
async def test_malformed_requests_get_a_4xx_with_what_to_fix(retriever, body, status, message):
    async with serving(retriever) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/search", content=body)
        health = await client.get("/health")
    assert response.status_code == status
    assert message in response.json()["error"]
    assert health.json() == {"status": "ok", "documents": len(retriever.documents)}


async def test_a_body_in_a_broken_content_encoding_gets_400(retriever):
    async with serving(retriever) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post(
            "/search", content=b"not gzip", headers={"Content-Encoding": "gzip"}
        )
    assert response.status_code == 400
    assert "Content-Encoding" in response.json()["error"]


HALF_REQUESTS = [
    b"",  # connects and says nothing
    b"POST /search HTTP/1.1\r\nHost: x\r\n",  # headers never finished
    b'POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"query"',  # body neither
]


async def test_half_sent_requests_beyond_the_cap_are_dropped_and_health_answers(retriever):
    timeout_s, cap = 1.0, 16
    async with serving(retriever, timeout_s=timeout_s, max_connections=cap) as url:
        host, port = url.removeprefix("http://").split(":")
        started = asyncio.get_running_loop().time()
        closings = []
        for i in range(50):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(HALF_REQUESTS[i % len(HALF_REQUESTS)])
            closings.append(asyncio.ensure_future(_seconds_until_closed(reader, writer, started)))
        health = await _health_when_answered(url, within_s=timeout_s + 2.0)
        closed_after_s = await asyncio.wait_for(asyncio.gather(*closings), timeout=10)
    assert health == {"status": "ok", "documents": len(retriever.documents)}
    assert sum(s < timeout_s for s in closed_after_s) >= 50 - cap  # refused, not timed out
    assert max(closed_after_s) < 2 * timeout_s + 1.0  # the held ones dropped, not kept


async def _seconds_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, started: float
) -> float:
    with contextlib.suppress(ConnectionResetError):
        await reader.read()  # until the server closes the connection
    writer.close()  # only now: a writer collected earlier would close the connection itself
    return asyncio.get_running_loop().time() - started


async def _health_when_answered(url: str, within_s: float) -> dict:
    deadline = asyncio.get_running_loop().time() + within_s
    async with httpx.AsyncClient(base_url=url, timeout=within_s) as client:
        while True:
            try:
                return (await client.get("/health")).json()
            except httpx.TransportError:  # refused while the slots are full
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)


async def test_an_unreachable_server_raises_a_tool_infrastructure_error_after_retries():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    client = HttpRetriever(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01)
    with pytest.raises(RetrieverUnavailableError, match="failed 3 attempt"):
        await client.search("Orvane", 3)
    await client.aclose()


@pytest.fixture
def server_process(tmp_path, retriever):
    """``palaestra search serve`` on the encyclopedia's index in its own process: (process, URL)."""
    retriever.save(tmp_path / "index")
    command = ["search", "serve", "--index", str(tmp_path / "index"), "--port", "0"]
    server = subprocess.Popen(
        [sys.executable, "-m", "palaestra", *command], stdout=subprocess.PIPE, text=True
    )
    try:
        yield server, server.stdout.readline().split()[-1]  # "serving N documents on URL"
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


def test_a_second_server_on_a_busy_port_exits_with_a_one_line_error(server_process, tmp_path):
    _, url = server_process
    port = url.rsplit(":", 1)[1]
    command = ["search", "serve", "--index", str(tmp_path / "index"), "--port", port]
    second = subprocess.run(
        [sys.executable, "-m", "palaestra", *command], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0
    assert f"error: cannot listen on 127.0.0.1:{port} (the port is in use)" in second.stderr
    assert "choose another --port" in second.stderr


def test_sync_steps_search_the_server_and_leave_no_connection_open(server_process):
    _, url = server_process
    env = SearchEnv(split="test", retriever_url=url)
    env.reset(options={"task_index": 0})
    gc.collect()  # earlier tests' garbage (an unwaited Popen, say) warns now, not below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for query in ("Lomel", "Kramun"):  # each sync step runs the tool in a fresh event loop
            observation, *_ = env.step(search_call(query))
            assert observation[0]["content"].startswith("[wiki-")
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks


async def test_a_server_killed_mid_run_ends_the_episodes_as_tool_errors(server_process):
    server, url = server_process
    shared = HttpRetriever(url, timeout_s=2.0, retries=2, backoff_s=0.05)
    envs = [SearchEnv(split="test", retriever=shared) for _ in range(8)]
    for i, env in enumerate(envs):
        await env.areset(options={"task_index": i})
    first = await asyncio.gather(
        *(env.astep(search_call(env.task.metadata["subject"])) for env in envs)
    )
    assert all(o[0][0]["content"].startswith("[wiki-") for o in first)
    server.kill()
    server.wait()
    second = await asyncio.wait_for(
        asyncio.gather(*(env.astep(search_call("Orvane")) for env in envs)), timeout=60
    )
    for _, reward, terminated, truncated, info in second:
        assert (reward, terminated, truncated) == (0.0, False, True)
        assert info["stop_reason"] == "tool_error"
        assert url in info["error"]
    await shared.aclose()


async def test_searches_in_flight_when_the_server_dies_fail_fast_as_unavailable(
    server_process, world
):
    server, url = server_process
    client = HttpRetriever(url, timeout_s=2.0, retries=1, backoff_s=0.05)
    searches = [asyncio.ensure_future(client.search(q.question, 3)) for q in world.questions[:200]]
    await next(asyncio.as_completed(searches))
    server.kill()  # mid-run: the other searches are queued, sent or being answered
    outcomes = await asyncio.wait_for(asyncio.gather(*searches, return_exceptions=True), timeout=60)
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert failed and all(isinstance(o, RetrieverUnavailableError) for o in failed)
    assert all(o for o in outcomes if not isinstance(o, Exception))  # the rest were answered
    await client.aclose()
