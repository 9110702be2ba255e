"""A retrieval server that dies and comes back, through real episodes: while it is down a
search ends its episode as an infrastructure failure (``tool_error``, dropped from training,
never reward 0); once ``palaestra search serve`` runs again on the same port, the same
client (its pooled connections gone stale) searches again, and a search made while the
server is down succeeds when it comes back within the client's retries."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EpisodeRequest, RolloutLimits, run_episode
from palaestra.agent.trajectory import StopReason
from palaestra.envs.search import BM25Retriever, Encyclopedia, HttpRetriever, SearchEnv

EOT = "<|im_end|>"


WORLD = Encyclopedia.generate(0)
"""The built-in encyclopedia the server indexes and ``SearchEnv`` asks about."""
TITLE = WORLD.documents[0].title
"""A query that finds a document."""


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "index"
    BM25Retriever.build(WORLD.documents).save(path)
    return path


def serve(index, port: int) -> tuple[subprocess.Popen, str]:
    """``palaestra search serve`` on ``port`` (0: a free one) in its own process, and its URL."""
    command = ["search", "serve", "--index", str(index), "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "palaestra", *command], stdout=subprocess.PIPE, text=True
    )
    return server, server.stdout.readline().split()[-1]  # "serving N documents on URL"


def stop(server: subprocess.Popen) -> None:
    server.kill()
    server.wait()
    server.stdout.close()


def turn(tokenizer, text: str) -> list[int]:
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(EOT)]


def search_call(query: str) -> str:
    call = {"name": "search", "arguments": {"query": query}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


async def play(env, engine, tokenizer, seed: int):
    return await run_episode(
        env,
        engine,
        ChatRenderer(tokenizer),
        SamplingParams(max_tokens=200),
        EpisodeRequest(0, seed),
        env_id="palaestra/Search-v0",
        limits=RolloutLimits(max_turns=3),
    )


async def test_a_search_server_that_comes_back_is_used_again(index, tokenizer):
    server, url = serve(index, 0)
    port = int(url.rsplit(":", 1)[1])
    client = HttpRetriever(url, timeout_s=2.0, retries=2, backoff_s=0.05)
    env = SearchEnv(split="test", retriever=client)
    search, answer = turn(tokenizer, search_call(TITLE)), turn(tokenizer, "\\boxed{Orvane}")
    engine = FakeEngine([search, answer, search, search, answer])
    try:
        served = await play(env, engine, tokenizer, seed=0)
        stop(server)
        down = await play(env, engine, tokenizer, seed=1)
        server, _ = serve(index, port)
        back = await play(env, engine, tokenizer, seed=2)
    finally:
        stop(server)
        await client.aclose()

    assert served.stop_reason is StopReason.ANSWERED and len(served.turns) == 2
    assert down.stop_reason is StopReason.TOOL_ERROR and down.stop_reason.is_infra_failure
    assert url in down.info["error"] and "failed 3 attempt" in down.info["error"]
    assert back.stop_reason is StopReason.ANSWERED and len(back.turns) == 2
    assert "[wiki-" in ChatRenderer(tokenizer).decode(list(back.token_ids))  # results read


async def test_a_search_made_while_the_server_is_down_waits_for_it_within_its_retries(index):
    server, url = serve(index, 0)
    port = int(url.rsplit(":", 1)[1])
    stop(server)
    patient = HttpRetriever(url, timeout_s=2.0, retries=8, backoff_s=0.1)  # ~25 s of pauses
    try:
        searching = asyncio.ensure_future(patient.search(TITLE, 3))
        server, _ = await asyncio.to_thread(serve, index, port)  # takes seconds to come up
        documents = await asyncio.wait_for(searching, 60)
    finally:
        stop(server)
        await patient.aclose()
    assert documents and documents[0].id.startswith("wiki-")
