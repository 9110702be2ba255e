"""The retrieval server over real loopback sockets: same answers as in-process, request
validation, and a dead or killed server reported as an infrastructure failure."""

from __future__ import annotations

import asyncio
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
    ("body", "message"),
    [
        ("not json", "the body must be JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"k": 3}', "'query' must be a non-empty string"),
        ('{"query": "Orvane", "k": 0}', "'k' must be an integer from 1 to 100"),
        ('{"query": "Orvane", "top": 3}', "unknown field(s) ['top']"),
    ],
)
async def test_malformed_requests_get_400_with_what_to_fix(retriever, body, message):
    async with serving(retriever) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/search", content=body)
        health = await client.get("/health")
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert health.json() == {"status": "ok", "documents": len(retriever.documents)}


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
