"""The policy step with the behaviour correction takes one forward per micro-batch and
gives the update of a separate scoring pass followed by the step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from palaestra.config_sections import GRPOConfig
from palaestra.models import load_model
from palaestra.trainer.batch import collate
from palaestra.trainer.learner import Learner, OptimSettings, policy_forward, token_logprobs
from palaestra.trainer.losses import PolicyLossSettings
from palaestra.trainer.policy_gradient import (
    behaviour_correction,
    corrected_step,
    dropout_active,
    policy_loss_fn,
)
from tests.trainer.test_learner import PAD, TRAJECTORIES

LOSS = policy_loss_fn(PolicyLossSettings(clip_low=0.2, clip_high=0.28))


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny-random")
    return model


def engine_batch(model):
    """A batch whose engine log-probs are the model's plus noise: weights away from 1,
    some of them above the cap."""
    batch = collate(TRAJECTORIES, pad_id=PAD, advantages=[1.0, -0.5, 0.25, -1.0])
    with torch.no_grad():
        exact = token_logprobs(model, batch)
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))
    return dataclasses.replace(batch, old_logprobs_BT=(exact + 0.5 * noise) * batch.loss_mask_BT)


class Counted:
    """The policy forward, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.forward = policy_forward(1.0)

    def __call__(self, model, micro):
        self.calls += 1
        return self.forward(model, micro)


def learner(model, forward):
    return Learner(model, OptimSettings(lr=1e-2, micro_batch_size=2), forward=forward)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_one_forward_gives_the_update_of_scoring_then_stepping(tiny, level):
    g = GRPOConfig(importance_sampling=level, is_cap=1.5)
    batch = engine_batch(tiny)
    fused_forward, reference_forward = Counted(), Counted()
    fused = learner(copy.deepcopy(tiny), fused_forward)
    reference = learner(copy.deepcopy(tiny), reference_forward)

    got = corrected_step(g, fused, batch, LOSS)
    corrected, mismatch = behaviour_correction(g, reference, batch)
    want = reference.step(corrected, LOSS) | mismatch

    assert fused_forward.calls == 2  # 4 rows, 2 per micro-batch, one forward each
    assert reference_forward.calls == 4  # a scoring pass, then the step's
    assert want["mismatch/capped_frac"] > 0  # the correction did something
    for name in ("grad_norm", "mismatch/abs_dlogprob", "mismatch/ess", "mismatch/capped_frac"):
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    for (name, a), (_, b) in zip(
        fused.model.named_parameters(), reference.model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_model_with_dropout_is_scored_separately(tiny):
    model = copy.deepcopy(tiny)
    assert not dropout_active(model)
    model.config.attention_dropout = 0.1  # a config number, no dropout module
    assert dropout_active(model)
    forward = Counted()
    corrected_step(GRPOConfig(), learner(model, forward), engine_batch(tiny), LOSS)
    assert forward.calls == 4


def test_without_importance_sampling_the_engine_logprobs_are_the_old_ones(tiny):
    batch = engine_batch(tiny)
    forward = Counted()
    metrics = corrected_step(
        GRPOConfig(importance_sampling="off"), learner(copy.deepcopy(tiny), forward), batch, LOSS
    )
    assert forward.calls == 2
    assert not any(name.startswith("mismatch/") for name in metrics)


def test_the_correction_needs_the_engine_logprobs(tiny):
    batch = dataclasses.replace(engine_batch(tiny), old_logprobs_BT=None)
    with pytest.raises(ValueError, match="sampler's logprobs"):
        corrected_step(GRPOConfig(), learner(copy.deepcopy(tiny), Counted()), batch, LOSS)
