"""Weight-sync verification: an engine that holds the learner's weights passes, any other fails.

The transformers engine in float32 scores a probe exactly as the learner does (~1e-6), so
a tight tolerance passes; after it is given other weights, or for a scripted engine that
knows no weights at all, the check raises ``WeightSyncError`` naming the gap.
"""

from __future__ import annotations

import copy

import pytest
import torch

from palaestra.agent.engines import FakeEngine, TransformersEngine
from palaestra.models import load_model
from palaestra.trainer.errors import WeightSyncError
from palaestra.trainer.weight_sync import default_tolerance, verify_engine_weights

PROBE = list(range(100, 140))


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny-random")
    return model


def engine_on(model) -> TransformersEngine:
    return TransformersEngine(
        copy.deepcopy(model), eos_token_ids=[2], pad_token_id=2, dtype="float32"
    )


async def test_an_engine_holding_the_learners_weights_passes(tiny):
    check = await verify_engine_weights(engine_on(tiny), tiny, PROBE, tolerance=1e-4)

    assert check.num_tokens == len(PROBE) - 1
    assert check.max_abs_dlogprob < 1e-4
    assert check.mean_abs_dlogprob <= check.max_abs_dlogprob
    assert check.policy_version == 0


async def test_an_engine_given_other_weights_fails_with_the_gap(tiny):
    engine = engine_on(tiny)
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in tiny.state_dict().items()}
    await engine.update_weights(other.items(), version=3)

    with pytest.raises(WeightSyncError, match=r"policy version 3.*max \|Δ logprob\| \d"):
        await verify_engine_weights(engine, tiny, PROBE, tolerance=default_tolerance("float32"))


async def test_a_scripted_engine_fails_and_a_short_answer_is_named(tiny):
    with pytest.raises(WeightSyncError, match="disagree"):
        await verify_engine_weights(FakeEngine([]), tiny, PROBE, tolerance=0.5)
    short = FakeEngine([], logprobs=lambda prompt, rest: [-1.0] * (len(rest) - 1))
    with pytest.raises(WeightSyncError, match=f"scored {len(PROBE) - 2} tokens"):
        await verify_engine_weights(short, tiny, PROBE, tolerance=0.5)


async def test_a_probe_needs_two_tokens(tiny):
    with pytest.raises(ValueError, match="at least 2"):
        await verify_engine_weights(engine_on(tiny), tiny, [5], tolerance=1e-4)
