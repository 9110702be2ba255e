"""Truncated importance weights from the sampling engine to the learner, and per-token
advantages in the policy loss: hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from palaestra.trainer.losses import (
    PolicyLossInputs,
    PolicyLossSettings,
    behaviour_weights,
    policy_loss,
)


def test_token_level_behaviour_weights_by_hand():
    # log pi_prox - log mu per token: row 0 = [ln 0.5, ln 3], row 1 = [ln 1.5, (masked)]
    prox = torch.tensor([[math.log(0.5), math.log(3.0)], [math.log(1.5), 9.0]])
    mu = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    w, m = behaviour_weights(prox, mu, mask, cap=2.0, level="token")
    assert torch.allclose(w, torch.tensor([[0.5, 2.0], [1.5, 0.0]]))  # 3 capped at 2
    assert m["mismatch/capped_frac"] == pytest.approx(1 / 3)
    assert m["mismatch/abs_dlogprob"] == pytest.approx(
        (math.log(2) + math.log(3) + math.log(1.5)) / 3
    )
    raw = [0.5, 3.0, 1.5]  # ESS of the untruncated weights: (sum w)^2 / (n sum w^2)
    assert m["mismatch/ess"] == pytest.approx(sum(raw) ** 2 / (3 * sum(x * x for x in raw)))


def test_sequence_level_weights_multiply_token_ratios():
    prox = torch.tensor([[math.log(0.5), math.log(3.0)], [math.log(1.5), 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    w, _ = behaviour_weights(prox, torch.zeros(2, 2), mask, cap=2.0, level="sequence")
    # row 0: 0.5 * 3 = 1.5 on both tokens; row 1: 1.5 on its one token
    assert torch.allclose(w, torch.tensor([[1.5, 1.5], [1.5, 0.0]]))


def test_agreeing_policies_give_unit_weights_and_full_ess():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    w, m = behaviour_weights(lp, lp.clone(), torch.ones(1, 3))
    assert torch.equal(w, torch.ones(1, 3))
    assert m["mismatch/ess"] == pytest.approx(1.0) and m["mismatch/abs_dlogprob"] == 0.0


def test_is_weights_scale_each_tokens_surrogate_and_gradient():
    lp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2)
    weights = torch.tensor([[0.5, 2.0]])
    inputs = PolicyLossInputs(old, torch.ones(1, 2), torch.ones(1, 2), is_weights_BT=weights)
    loss, _ = policy_loss(lp, inputs, PolicyLossSettings())
    # ratio 1, A = 1: per-token surrogate -1 scaled by the weights, token-mean over 2 tokens
    assert loss.item() == pytest.approx(-(0.5 + 2.0) / 2)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -1.0]]))


def test_behaviour_weight_arguments_are_checked():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="cap"):
        behaviour_weights(lp, lp, torch.ones(1, 2), cap=0.5)
    with pytest.raises(ValueError, match="level"):
        behaviour_weights(lp, lp, torch.ones(1, 2), level="batch")


def test_each_token_takes_its_own_advantage():
    logprobs = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.0, -2.0]])  # ratio 1 everywhere: the loss is -mean(A_t)
    mask = torch.tensor([[0.0, 1.0, 1.0]])

    def loss_with(advantages_BT: torch.Tensor) -> torch.Tensor:
        inputs = PolicyLossInputs(old, advantages_BT, mask)
        return policy_loss(logprobs, inputs, PolicyLossSettings())[0]

    per_seq = loss_with(torch.tensor([0.5])[:, None].expand_as(mask))
    same = loss_with(torch.full((1, 3), 0.5))
    per_turn = loss_with(torch.tensor([[0, 1.0, -3.0]]))

    assert same.item() == pytest.approx(per_seq.item()) == pytest.approx(-0.5)
    assert per_turn.item() == pytest.approx(-(1.0 - 3.0) / 2)
    (grad,) = torch.autograd.grad(per_turn, logprobs)
    assert grad[0].tolist() == pytest.approx([0.0, -0.5, 1.5])  # d(-ratio * A / n)/dlogprob
