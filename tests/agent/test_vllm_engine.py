"""The vLLM engine: token ids and logprobs the learner reproduces, before and after syncs.

One float32 engine on a tiny random Llama (head_dim 32: vLLM's CPU attention does not take
``tiny-random``'s 8) serves the whole module, on one event loop; start-up is ~20 s of the
tier's time. In float32 vLLM's logprobs match the learner's ``token_logprobs`` to ~1e-4
nats, at any temperature and after a weight sync, and wrong weights are off by nats.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util

import pytest
import pytest_asyncio
import torch

from palaestra.agent.engines import Engine, SamplingParams
from palaestra.agent.engines.vllm import VLLMEngine
from palaestra.agent.errors import EngineError
from palaestra.models import load_model
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.errors import WeightSyncError
from palaestra.trainer.learner import token_logprobs
from palaestra.trainer.weight_sync import verify_engine_weights

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vllm tier SKIPPED: vLLM is not installed; `make setup-vllm` installs it",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

EOS = 2
PROMPT = list(range(100, 120))
FLOAT32_TOLERANCE = 5e-4  # measured: max |Δ| ~1e-4 over a few hundred tokens


@pytest.fixture(scope="module")
def learner_model(vllm_tiny_model_dir):
    model, _ = load_model(vllm_tiny_model_dir)
    return model


@pytest.fixture(scope="module")
def stop_token(learner_model):
    """The third token greedy decoding of ``PROMPT`` emits, made an end-of-turn id below."""
    with torch.no_grad():
        greedy = learner_model.generate(
            torch.tensor([PROMPT]), max_new_tokens=3, do_sample=False, eos_token_id=None
        )
    return int(greedy[0, -1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vllm_tiny_model_dir, stop_token):
    engine = VLLMEngine.from_model_dir(
        vllm_tiny_model_dir,
        eos_token_ids=[EOS, stop_token],
        dtype="float32",
        seed=0,
        max_model_len=512,
    )
    yield engine
    engine.close()


@pytest_asyncio.fixture(loop_scope="module")
async def restore_weights(engine, learner_model):
    """Put the learner's weights back into the engine after a test that changed them."""
    yield
    await engine.update_weights(learner_model.state_dict().items(), engine.policy_version + 1)


def learner_logprobs_of(model, prompt, completion, temperature):
    """The learner's logprobs of ``completion`` after ``prompt``, at ``temperature``."""
    ids_1T = torch.tensor([prompt + completion])
    mask_1T = torch.ones_like(ids_1T)
    batch = TokenBatch(ids_1T, mask_1T, mask_1T.float())
    with torch.no_grad():
        logprobs_T = token_logprobs(model, batch, temperature=temperature or 1.0)[0]
    return logprobs_T[len(prompt) :].tolist()


def perturbed(model, seed):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(
                torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.1
            )
    return other


async def test_a_completion_has_token_ids_logprobs_and_a_finish_reason(engine, stop_token):
    long = await engine.generate([5, 6, 7], SamplingParams(max_tokens=6, seed=0))
    stopped = await engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))

    assert isinstance(engine, Engine)
    assert len(long.token_ids) == len(long.logprobs) == 6
    assert long.finish_reason == "length" and long.policy_version == engine.policy_version
    assert all(lp <= 0 for lp in long.logprobs)
    assert stopped.finish_reason == "stop"
    assert len(stopped.token_ids) == len(stopped.logprobs) == 3
    assert stopped.token_ids[-1] == stop_token  # the end-of-turn token is kept


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.3])
async def test_sampled_logprobs_are_the_learners_at_the_sampling_temperature(
    engine, learner_model, temperature
):
    samplings = [SamplingParams(max_tokens=16, temperature=temperature, seed=s) for s in range(4)]

    completions = await asyncio.gather(*[engine.generate(PROMPT, s) for s in samplings])

    for completion in completions:
        expected = learner_logprobs_of(
            learner_model, PROMPT, list(completion.token_ids), temperature
        )
        assert completion.logprobs == pytest.approx(expected, abs=FLOAT32_TOLERANCE)


async def test_a_seeded_request_is_reproducible_and_the_seed_matters(engine):
    first = await engine.generate(PROMPT, SamplingParams(max_tokens=16, seed=7))
    again = await engine.generate(PROMPT, SamplingParams(max_tokens=16, seed=7))
    other = await engine.generate(PROMPT, SamplingParams(max_tokens=16, seed=8))

    assert first == again
    assert other.token_ids != first.token_ids


async def test_seeded_requests_beyond_one_steps_token_budget_all_complete(engine):
    """64 seeded prompts of 300 tokens fill several scheduler steps (512 tokens each): on
    CPU a prompt prefilled in parts used to kill vLLM's worker."""
    prompts = [[(7 * i + j) % 400 + 10 for j in range(300)] for i in range(64)]

    completions = await asyncio.gather(
        *(engine.generate(p, SamplingParams(max_tokens=4, seed=i)) for i, p in enumerate(prompts))
    )

    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in completions)


async def test_score_matches_the_learner_and_verification_passes(engine, learner_model):
    probe = PROMPT + list((await engine.generate(PROMPT, SamplingParams(max_tokens=24))).token_ids)

    check = await verify_engine_weights(engine, learner_model, probe, tolerance=FLOAT32_TOLERANCE)

    assert check.num_tokens == len(probe) - 1
    assert check.max_abs_dlogprob < FLOAT32_TOLERANCE
    assert check.policy_version == engine.policy_version


async def test_after_a_sync_the_engine_samples_from_the_new_weights(
    engine, learner_model, restore_weights
):
    trained = perturbed(learner_model, seed=1)
    version = engine.policy_version + 1

    await engine.update_weights(trained.state_dict().items(), version=version)
    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0.7))
    check = await verify_engine_weights(
        engine, trained, PROMPT + list(completion.token_ids), tolerance=FLOAT32_TOLERANCE
    )

    assert engine.policy_version == completion.policy_version == version
    assert engine.last_sync_s > 0
    assert check.max_abs_dlogprob < FLOAT32_TOLERANCE
    expected = learner_logprobs_of(trained, PROMPT, list(completion.token_ids), 0.7)
    assert completion.logprobs == pytest.approx(expected, abs=FLOAT32_TOLERANCE)


async def test_verification_catches_a_sync_of_the_wrong_weights(
    engine, learner_model, restore_weights
):
    learner_holds = perturbed(learner_model, seed=1)
    engine_got = perturbed(learner_model, seed=2)  # e.g. another run's checkpoint

    await engine.update_weights(engine_got.state_dict().items(), engine.policy_version + 1)

    with pytest.raises(WeightSyncError, match=r"max \|Δ logprob\| .* > tolerance"):
        await verify_engine_weights(engine, learner_holds, PROMPT, tolerance=FLOAT32_TOLERANCE)


async def test_versions_advance_with_each_sync_and_stamp_completions(
    engine, learner_model, restore_weights
):
    start = engine.policy_version
    stamps = []
    for version in (start + 1, start + 2):
        await engine.update_weights(learner_model.state_dict().items(), version=version)
        completion = await engine.generate(PROMPT, SamplingParams(max_tokens=2))
        stamps.append(completion.policy_version)

    assert stamps == [start + 1, start + 2]


async def test_a_request_in_flight_finishes_on_the_weights_it_started_with(
    engine, learner_model, restore_weights
):
    trained = perturbed(learner_model, seed=3)
    old_version = engine.policy_version
    sampling = SamplingParams(max_tokens=64, temperature=1.0, seed=0)

    completion, _ = await asyncio.gather(
        engine.generate(PROMPT, sampling),
        engine.update_weights(trained.state_dict().items(), version=old_version + 1),
    )

    assert completion.policy_version == old_version
    expected = learner_logprobs_of(learner_model, PROMPT, list(completion.token_ids), 1.0)
    assert completion.logprobs == pytest.approx(expected, abs=FLOAT32_TOLERANCE)
    assert engine.policy_version == old_version + 1


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: {**sd, "model.no_such.weight": torch.zeros(1)}, "does not have"),
        (lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"}, "missing"),
        (lambda sd: {**sd, "model.norm.weight": torch.ones(3)}, "shape"),
    ],
)
async def test_a_mismatched_state_dict_is_refused_before_anything_changes(
    engine, learner_model, edit, match
):
    version = engine.policy_version
    state = {k: v + 1 for k, v in learner_model.state_dict().items()}

    with pytest.raises(EngineError, match=match):
        await engine.update_weights(edit(state).items(), version=version + 1)

    assert engine.policy_version == version
    await verify_engine_weights(engine, learner_model, PROMPT, tolerance=FLOAT32_TOLERANCE)


@pytest.mark.parametrize("prompt", [[], [5, -1], [5, 10**6]])
async def test_a_bad_prompt_raises_engine_error(engine, prompt):
    with pytest.raises(EngineError):
        await engine.generate(prompt, SamplingParams(max_tokens=3))


async def test_top_p_below_one_is_refused_with_the_reason(engine):
    with pytest.raises(EngineError, match="top_p"):
        await engine.generate(PROMPT, SamplingParams(max_tokens=3, top_p=0.9))
