"""Engines: exact logprobs, stopping, seeding, batching and weight updates.

``TransformersEngine`` runs on the tiny random model in float32, where its logprobs must
equal a teacher-forced forward of prompt + completion. ``FakeEngine`` is tested as the
scripted stand-in other tests rely on.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from palaestra.agent.engines import Engine, FakeEngine, TransformersEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.engines.transformers import sample_tokens
from palaestra.agent.errors import EngineError
from palaestra.models import load_model

EOS = 2
PROMPTS = [[5, 6, 7], list(range(100, 120)), [9], list(range(300, 309))]


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = load_model("tiny-random")
    return model


@pytest.fixture
def make_engine(tiny_model):
    def make(**kwargs) -> TransformersEngine:
        kwargs = {"eos_token_ids": [EOS], "pad_token_id": EOS, "dtype": "float32", **kwargs}
        return TransformersEngine(copy.deepcopy(tiny_model), **kwargs)

    return make


def teacher_forced_logprobs(model, prompt_ids, completion_ids, temperature):
    """Logprob of each completion token under one plain forward of prompt + completion."""
    with torch.no_grad():
        logits_TV = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float()
    logprobs_TV = torch.log_softmax(logits_TV / (temperature or 1.0), -1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return [logprobs_TV[p, t].item() for p, t in zip(positions, completion_ids, strict=True)]


async def test_a_completion_has_one_logprob_per_token_and_the_policy_version(make_engine):
    engine = make_engine()

    completion = await engine.generate([5, 6, 7], SamplingParams(max_tokens=10, seed=0))

    assert isinstance(engine, Engine)
    assert 0 < len(completion.token_ids) == len(completion.logprobs) <= 10
    assert all(lp <= 0 for lp in completion.logprobs)
    assert completion.policy_version == engine.policy_version == 0


async def test_logprobs_equal_a_teacher_forced_forward_of_prompt_and_completion(
    make_engine, tiny_model
):
    engine = make_engine()
    samplings = [
        SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=8, temperature=0.7, seed=3),
        SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9),
        SamplingParams(max_tokens=16, temperature=1.3, seed=5),
    ]

    completions = await asyncio.gather(
        *[engine.generate(p, s) for p, s in zip(PROMPTS, samplings, strict=True)]
    )

    assert engine.num_batches == 1
    for prompt, sampling, completion in zip(PROMPTS, samplings, completions, strict=True):
        expected = teacher_forced_logprobs(
            tiny_model, prompt, list(completion.token_ids), sampling.temperature
        )
        assert completion.logprobs == pytest.approx(expected, abs=1e-4)


async def test_a_row_stops_at_eos_and_keeps_the_eos_token(make_engine):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    free_run = await make_engine().generate([5, 6, 7], greedy)
    eos = free_run.token_ids[2]
    stop_at = free_run.token_ids.index(eos) + 1  # the first time greedy decoding emits it

    completion = await make_engine(eos_token_ids=[eos]).generate([5, 6, 7], greedy)

    assert completion.finish_reason == "stop"
    assert completion.token_ids == free_run.token_ids[:stop_at]
    assert completion.logprobs == pytest.approx(free_run.logprobs[:stop_at], abs=1e-6)


async def test_max_tokens_ends_a_completion_with_finish_reason_length(make_engine):
    completion = await make_engine().generate([5, 6, 7], SamplingParams(max_tokens=5, seed=1))

    assert len(completion.token_ids) == 5
    assert completion.finish_reason == "length"


async def test_greedy_decoding_is_deterministic(make_engine):
    greedy = SamplingParams(max_tokens=16, temperature=0.0)

    first = await make_engine(seed=1).generate(PROMPTS[1], greedy)
    second = await make_engine(seed=2).generate(PROMPTS[1], greedy)

    assert first == second


async def test_a_seeded_request_is_reproducible_whatever_shares_its_batch(make_engine):
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    alone = await make_engine().generate(PROMPTS[1], seeded)

    engine = make_engine(seed=123)
    others = [engine.generate(p, SamplingParams(max_tokens=24)) for p in PROMPTS * 2]
    crowded, *_ = await asyncio.gather(engine.generate(PROMPTS[1], seeded), *others)
    reseeded = await make_engine().generate(PROMPTS[1], SamplingParams(max_tokens=16, seed=8))

    assert engine.num_batches == 1
    assert crowded.token_ids == alone.token_ids
    assert crowded.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert reseeded.token_ids != alone.token_ids


async def test_unseeded_requests_follow_the_engine_seed(make_engine):
    unseeded = SamplingParams(max_tokens=16)

    first = await make_engine(seed=4).generate(PROMPTS[0], unseeded)
    again = await make_engine(seed=4).generate(PROMPTS[0], unseeded)
    other = await make_engine(seed=5).generate(PROMPTS[0], unseeded)

    assert first.token_ids == again.token_ids != other.token_ids


async def test_concurrent_requests_share_a_batch_and_each_equals_its_solo_result(make_engine):
    engine = make_engine()
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = [list(range(200, 200 + n)) for n in (1, 4, 9, 17, 30)]
    solo = [await engine.generate(p, greedy) for p in prompts]
    assert engine.num_batches == len(prompts)

    batched = await asyncio.gather(*[engine.generate(p, greedy) for p in prompts])

    assert engine.num_batches == len(prompts) + 1
    for alone, together in zip(solo, batched, strict=True):
        assert together.token_ids == alone.token_ids
        assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


async def test_batches_hold_at_most_max_batch_size_requests(make_engine):
    engine = make_engine(max_batch_size=2)

    await asyncio.gather(*[engine.generate(p, SamplingParams(max_tokens=3)) for p in PROMPTS])

    assert engine.num_batches == 2


async def test_a_cancelled_request_stops_decoding_at_once(make_engine):
    # Ctrl-C cancels the rollouts in flight: the engine must not decode them to the end.
    engine = make_engine()
    forwards = 0

    def count(*_):
        nonlocal forwards
        forwards += 1

    engine.model.register_forward_hook(count)
    long = asyncio.ensure_future(
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=4000, temperature=1.0, seed=0))
    )
    while forwards < 3:  # decoding has started
        await asyncio.sleep(0.01)
    long.cancel()
    short = await engine.generate(PROMPTS[1], SamplingParams(max_tokens=2, seed=0))

    assert len(short.token_ids) <= 2
    assert forwards < 1000  # the long request stopped after a few tokens, not 4000


async def test_update_weights_changes_outputs_and_stamps_the_version(make_engine, tiny_model):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    engine = make_engine()
    before = await engine.generate(PROMPTS[1], greedy)
    new_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for param in new_model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))

    await engine.update_weights(new_model.state_dict().items(), version=3)
    after = await engine.generate(PROMPTS[1], greedy)

    assert engine.policy_version == after.policy_version == 3
    assert after.token_ids != before.token_ids
    assert after.logprobs == pytest.approx(
        teacher_forced_logprobs(new_model, PROMPTS[1], list(after.token_ids), 0.0), abs=1e-4
    )


async def test_update_weights_accepts_parameter_names_without_the_tied_alias(make_engine):
    engine = make_engine()
    named = [(n, p.detach() * 0.5) for n, p in engine.model.named_parameters()]
    assert "lm_head.weight" not in dict(named)

    await engine.update_weights(named, version=1)

    assert engine.policy_version == 1
    assert torch.equal(engine.model.lm_head.weight, engine.model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    ("rename", "match"),
    [
        (lambda sd: {**sd, "model.no_such.weight": torch.zeros(1)}, "does not have"),
        (lambda sd: {k: v for k, v in sd.items() if "layers.0." not in k}, "missing"),
        (lambda sd: {**sd, "model.norm.weight": torch.ones(3)}, "shape"),
    ],
)
async def test_update_weights_rejects_mismatched_tensors_and_changes_nothing(
    make_engine, rename, match
):
    engine = make_engine()
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    state = {k: v + 1 for k, v in engine.model.state_dict().items()}

    with pytest.raises(EngineError, match=match):
        await engine.update_weights(rename(state).items(), version=1)

    assert engine.policy_version == 0
    assert all(torch.equal(v, before[k]) for k, v in engine.model.state_dict().items())


@pytest.mark.parametrize("prompt", [[], [5, -1], [5, 10**6]])
async def test_a_bad_prompt_raises_engine_error(make_engine, prompt):
    with pytest.raises(EngineError):
        await make_engine().generate(prompt, SamplingParams(max_tokens=3))


def test_an_engine_serves_one_event_loop_after_another(make_engine):
    engine = make_engine()
    greedy = SamplingParams(max_tokens=6, temperature=0.0)

    first = asyncio.run(engine.generate(PROMPTS[0], greedy))
    second = asyncio.run(engine.generate(PROMPTS[0], greedy))

    assert first == second


async def test_bfloat16_generation_stays_close_to_float32(make_engine, tiny_model):
    engine = make_engine(dtype="bfloat16")

    completion = await engine.generate(PROMPTS[1], SamplingParams(max_tokens=16, seed=0))

    assert next(engine.model.parameters()).dtype == torch.bfloat16
    expected = teacher_forced_logprobs(tiny_model, PROMPTS[1], list(completion.token_ids), 1.0)
    assert completion.logprobs == pytest.approx(expected, abs=0.5)


# --- sample_tokens -----------------------------------------------------------------------


def test_a_bfloat16_prefill_never_copies_the_lm_head_per_row(make_engine, tiny_model):
    # A frozen bfloat16 copy, as the trainer builds it: weights that do not require grad.
    engine = make_engine(dtype="bfloat16")
    engine.model.requires_grad_(False)
    rows, width = 64, 30
    vocab, hidden = tiny_model.config.vocab_size, tiny_model.config.hidden_size
    head_per_row_bytes = rows * vocab * hidden * 2  # the batch-expanded bf16 head: 50 MB
    input_ids_BT = torch.randint(10, 1000, (rows, width))

    # The engine's prefill: the whole prompt batch, logits for the last position only.
    with torch.inference_mode(), torch.profiler.profile(profile_memory=True) as profile:
        logits_B1V = engine.model(input_ids=input_ids_BT, logits_to_keep=1).logits

    largest = max(event.cpu_memory_usage for event in profile.events())
    assert logits_B1V.shape == (rows, 1, vocab)
    assert largest < head_per_row_bytes / 4, f"one op allocated {largest / 1e6:.0f} MB"


def test_sample_tokens_greedy_takes_the_argmax_with_its_temperature_one_logprob():
    logits_BV = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])

    tokens_B, logprobs_B = sample_tokens(
        logits_BV,
        temperatures=[0.0, 0.0],
        top_ps=[1.0, 1.0],
        generators=[torch.Generator(), torch.Generator()],
    )

    assert tokens_B.tolist() == [1, 0]
    expected = torch.log_softmax(logits_BV, -1)[[0, 1], [1, 0]]
    assert torch.allclose(logprobs_B, expected)


def test_sample_tokens_draws_from_the_tempered_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits_BV = probs.log().repeat(4000, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]

    tokens_B, logprobs_B = sample_tokens(
        logits_BV, temperatures=[1.0] * 4000, top_ps=[0.7] * 4000, generators=generators
    )

    counts = torch.bincount(tokens_B, minlength=4)
    assert counts[2:].sum() == 0  # outside the 0.7 nucleus {0.5, 0.3}
    assert counts[0].item() / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    assert torch.allclose(logprobs_B, probs.log()[tokens_B])  # before the nucleus cut


def test_sample_tokens_at_temperature_two_flattens_the_distribution():
    logits_BV = torch.tensor([[2.0, 0.0]]).repeat(4000, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]

    tokens_B, logprobs_B = sample_tokens(
        logits_BV, temperatures=[2.0] * 4000, top_ps=[1.0] * 4000, generators=generators
    )

    expected_B = torch.log_softmax(torch.tensor([1.0, 0.0]), -1)
    assert (tokens_B == 0).float().mean().item() == pytest.approx(
        expected_B[0].exp().item(), abs=0.03
    )
    assert torch.allclose(logprobs_B, expected_B[tokens_B])


# --- the embedded model ------------------------------------------------------------------


@pytest.mark.slow
async def test_the_embedded_model_answers_a_chat_prompt():
    model, tokenizer = load_model("smollm2-135m")
    engine = TransformersEngine(
        model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )

    completion = await engine.generate(prompt_ids, SamplingParams(max_tokens=48, temperature=0))

    assert completion.token_ids
    if completion.finish_reason == "stop":
        assert completion.token_ids[-1] == tokenizer.eos_token_id
    else:
        assert completion.finish_reason == "length" and len(completion.token_ids) == 48
    assert tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()


# --- FakeEngine --------------------------------------------------------------------------


async def test_fake_engine_serves_scripted_completions_in_order_and_records_prompts():
    engine = FakeEngine([[1, 2, EOS], [3, EOS]])
    sampling = SamplingParams(max_tokens=8)

    first = await engine.generate([10, 11], sampling)
    second = await engine.generate([12], sampling)

    assert isinstance(engine, Engine)
    assert first.token_ids == (1, 2, EOS) and first.logprobs == (-1.0, -1.0, -1.0)
    assert second.token_ids == (3, EOS) and second.finish_reason == "stop"
    assert engine.prompts == [[10, 11], [12]]
    assert engine.sampling == [sampling, sampling]


async def test_fake_engine_cuts_at_max_tokens_with_finish_reason_length():
    engine = FakeEngine([[1, 2, 3, 4]])

    completion = await engine.generate([10], SamplingParams(max_tokens=2))

    assert completion.token_ids == (1, 2)
    assert completion.logprobs == (-1.0, -1.0)
    assert completion.finish_reason == "length"


async def test_fake_engine_takes_a_function_of_the_prompt_and_given_logprobs():
    engine = FakeEngine(
        lambda prompt: [len(prompt), EOS],
        logprobs=lambda prompt, completion: [-0.5 * (i + 1) for i in range(len(completion))],
    )

    completion = await engine.generate([7, 7, 7], SamplingParams())

    assert completion.token_ids == (3, EOS)
    assert completion.logprobs == (-0.5, -1.0)


async def test_fake_engine_says_when_its_script_runs_out():
    engine = FakeEngine([[1]])
    await engine.generate([10], SamplingParams())

    with pytest.raises(EngineError, match="ran out after 1"):
        await engine.generate([10], SamplingParams())


async def test_fake_engine_update_weights_records_names_and_bumps_the_version():
    engine = FakeEngine([[1]], logprobs=-0.25)

    await engine.update_weights([("a.weight", torch.zeros(1)), ("b.bias", torch.ones(2))], 4)
    completion = await engine.generate([10], SamplingParams())

    assert engine.policy_version == completion.policy_version == 4
    assert engine.weight_updates == [(4, ["a.weight", "b.bias"])]
    assert completion.logprobs == (-0.25,)


async def test_score_is_a_teacher_forced_forward_at_temperature_one(make_engine, tiny_model):
    engine = make_engine()
    sequence = PROMPTS[1] + PROMPTS[3]

    scores = await engine.score(sequence)

    expected = teacher_forced_logprobs(tiny_model, sequence[:1], sequence[1:], 1.0)
    assert scores == pytest.approx(expected, abs=1e-5)


async def test_fake_engine_scores_with_its_scripted_logprobs():
    engine = FakeEngine([], logprobs=lambda prompt, rest: [-0.5] * len(rest))

    assert await engine.score([1, 2, 3]) == [-0.5, -0.5]
    assert await FakeEngine([]).score([1, 2]) == [-1.0]


def test_weights_file_holds_tied_tensors_once_each_cast_to_the_engine_dtype(tmp_path):
    from safetensors.torch import load_file

    from palaestra.agent.engines.vllm_worker import write_weights_file

    embedding = torch.randn(4, 3)
    named = [
        ("embed.weight", embedding),
        ("lm_head.weight", embedding),
        ("step", torch.ones(2, dtype=torch.int64)),
    ]

    path = write_weights_file(named, tmp_path, dtype="bfloat16")
    loaded = load_file(path)

    assert loaded["embed.weight"].dtype == loaded["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["lm_head.weight"], embedding.to(torch.bfloat16))
    assert loaded["step"].dtype == torch.int64  # integers are not cast
    assert load_file(write_weights_file(named[:1], tmp_path))["embed.weight"].dtype == torch.float32


async def test_build_engine_starts_the_named_engine_and_refuses_what_it_cannot(tiny_model):
    from palaestra.agent.engines.build import ServerSettings, build_engine, close_engine
    from palaestra.agent.engines.openai import OpenAIEngine

    common = {"model": tiny_model, "model_dir": "unused", "eos_token_ids": [EOS]}
    local = build_engine("transformers", **common, pad_token_id=None, dtype="float32")
    remote = build_engine(
        "openai", **common, pad_token_id=None, server=ServerSettings("http://h:1", "policy")
    )

    assert isinstance(local, TransformersEngine) and local.pad_token_id == EOS
    assert isinstance(remote, OpenAIEngine) and remote.model == "policy"
    await close_engine(remote)
    with pytest.raises(ValueError, match="server settings"):
        build_engine("openai", **common, pad_token_id=0)
    with pytest.raises(ValueError, match="unknown engine 'jax'"):
        build_engine("jax", **common, pad_token_id=0)
