"""A vLLM engine whose process is killed mid-run: the requests in flight fail as engine
errors (infrastructure failures of their episodes), the next call starts vLLM again with
the weights last given, and after ``max_restarts`` restarts calls fail with the reason.

One float32 engine on the tiny random Llama (``vllm_tiny_model_dir``), started once and
restarted once here: ~40 s of the vllm tier. Its engine-core process is found as the
child process that appeared with the engine and is named ``VLLM::EngineCore``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import os
import signal

import pytest
import pytest_asyncio
import torch

from palaestra import envs
from palaestra.agent.engines import SamplingParams
from palaestra.agent.errors import EngineError
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EpisodeRequest, run_episode
from palaestra.agent.trajectory import StopReason
from palaestra.models import load_model
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.learner import token_logprobs
from palaestra.trainer.weight_sync import verify_engine_weights

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vllm tier SKIPPED: vLLM is not installed; `make setup-vllm` installs it",
        allow_module_level=True,
    )

import psutil  # a dependency of vLLM

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

EOS = 2
PROMPT = list(range(100, 120))
FLOAT32_TOLERANCE = 5e-4  # as in test_vllm_engine: max |Δ| ~1e-4 in float32


def engine_core_pids(before: set[int]) -> list[int]:
    """vLLM engine-core processes among this process's children not in ``before``."""
    return [
        child.pid
        for child in psutil.Process().children(recursive=True)
        if child.pid not in before and "EngineCore" in " ".join(child.cmdline())
    ]


@pytest.fixture(scope="module")
def trained(vllm_tiny_model_dir):
    """The learner's weights after 'training': the model directory's, moved."""
    model, _ = load_model(vllm_tiny_model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vllm_tiny_model_dir):
    from palaestra.agent.engines.vllm import VLLMEngine

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    engine = VLLMEngine.from_model_dir(
        vllm_tiny_model_dir,
        eos_token_ids=[EOS],
        dtype="float32",
        seed=0,
        max_model_len=512,
        max_restarts=1,
    )
    engine.spawned_before = before  # type: ignore[attr-defined]
    yield engine
    engine.close()


def kill_engine_core(engine) -> None:
    (pid,) = engine_core_pids(engine.spawned_before)
    os.kill(pid, signal.SIGKILL)


def learner_logprobs(model, prompt, completion):
    ids_1T = torch.tensor([prompt + completion])
    mask_1T = torch.ones_like(ids_1T)
    with torch.no_grad():
        logprobs_T = token_logprobs(model, TokenBatch(ids_1T, mask_1T, mask_1T.float()))[0]
    return logprobs_T[len(prompt) :].tolist()


async def test_a_killed_engine_fails_its_requests_then_restarts_with_the_last_weights(
    engine, trained, tokenizer, vllm_tiny_model_dir
):
    await engine.update_weights(trained.state_dict().items(), version=7)
    env = envs.make("palaestra-test/OddLength-v0")
    long = SamplingParams(max_tokens=400, temperature=1.0)
    in_flight = [asyncio.ensure_future(engine.generate(PROMPT, long)) for _ in range(4)]
    episode = asyncio.ensure_future(
        run_episode(env, engine, ChatRenderer(tokenizer), long, EpisodeRequest(0, 0), env_id="e")
    )
    await asyncio.sleep(0)  # let the requests reach vLLM
    kill_engine_core(engine)

    failed = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 60)
    played = await asyncio.wait_for(episode, 60)

    assert all(isinstance(f, EngineError) for f in failed), failed
    assert "died" in str(failed[0])
    assert played.stop_reason is StopReason.ENGINE_ERROR and played.stop_reason.is_infra_failure
    # the next call starts vLLM again, on the weights last given and their version
    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=24, seed=3))
    assert engine.restarts == 1 and completion.policy_version == engine.policy_version == 7
    expected = learner_logprobs(trained, PROMPT, list(completion.token_ids))
    gaps = [abs(a - b) for a, b in zip(completion.logprobs, expected, strict=True)]
    assert max(gaps) < FLOAT32_TOLERANCE
    probe = PROMPT + list(completion.token_ids)
    await verify_engine_weights(engine, trained, probe, tolerance=FLOAT32_TOLERANCE)
    untrained, _ = load_model(vllm_tiny_model_dir)
    off = await verify_engine_weights(engine, untrained, probe, tolerance=float("inf"))
    assert off.max_abs_dlogprob > 0.1  # not the model directory's weights


async def test_after_max_restarts_a_dead_engine_fails_every_call_with_the_reason(engine, trained):
    assert engine.restarts == engine.max_restarts == 1
    kill_engine_core(engine)
    with pytest.raises(EngineError):  # in flight, or refused at once
        await engine.generate(PROMPT, SamplingParams(max_tokens=400))

    for _ in range(2):
        with pytest.raises(EngineError, match=r"restarted 1 time\(s\) \(max_restarts = 1\)"):
            await engine.generate(PROMPT, SamplingParams(max_tokens=4))
    with pytest.raises(EngineError, match="max_restarts"):
        await engine.update_weights(copy.deepcopy(trained).state_dict().items(), version=8)
    assert engine.restarts == 1
