"""Learner and batches: logprobs, micro-batch equivalence, and the direction of a step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.models import load_model
from palaestra.trainer.batch import collate
from palaestra.trainer.learner import Learner, OptimSettings, policy_forward, token_logprobs
from palaestra.trainer.losses import PolicyLossInputs, PolicyLossSettings, policy_loss

PAD = 2


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny-random")
    return model


def trajectory(prompt: list[int], sampled: list[int]) -> Trajectory:
    return Trajectory(
        token_ids=tuple(prompt + sampled),
        loss_mask=(0,) * len(prompt) + (1,) * len(sampled),
        logprobs=(0.0,) * len(prompt) + (-1.0,) * len(sampled),
        turns=(),
        reward=0.0,
        reward_components={},
        stop_reason=StopReason.ANSWERED,
        policy_version=0,
        group_id=0,
        env_id="e",
        task_id="t",
    )


TRAJECTORIES = [
    trajectory([5, 6, 7], [10, 11, 12, 13]),
    trajectory([5, 6], [20, 21]),
    trajectory([8, 9, 10, 11, 12], [30]),
    trajectory([4], [40, 41, 42]),
]


def test_collate_pads_right_and_masks_sampled_tokens_only():
    batch = collate(TRAJECTORIES[:2], pad_id=PAD, advantages=[1.0, -1.0])
    assert batch.input_ids_BT.tolist() == [[5, 6, 7, 10, 11, 12, 13], [5, 6, 20, 21, PAD, PAD, PAD]]
    assert batch.attention_mask_BT.tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert batch.loss_mask_BT.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]
    assert batch.num_loss_tokens == 6
    assert batch.advantages_BT.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, -1, -1, 0, 0, 0]]
    assert [len(m) for m in batch.micro_batches(1)] == [1, 1]
    assert batch.micro_batches(1)[1].input_ids_BT.shape == (1, 4)  # trimmed to its row


def test_token_logprobs_match_a_full_log_softmax(tiny):
    batch = collate(TRAJECTORIES, pad_id=PAD)
    with torch.no_grad():
        got = token_logprobs(tiny, batch, temperature=0.7)
        logits = tiny(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        full = torch.log_softmax(logits[:, :-1].float() / 0.7, dim=-1)
        want = (
            full.gather(2, batch.input_ids_BT[:, 1:, None]).squeeze(2) * batch.loss_mask_BT[:, 1:]
        )
    assert torch.allclose(got[:, 1:], want, atol=1e-5)
    assert torch.all(got[batch.loss_mask_BT == 0] == 0)


def grpo_loss(batch, logprobs_BT, *, num_tokens, num_seqs):
    inputs = PolicyLossInputs(
        old_logprobs_BT=batch.old_logprobs_BT,
        advantages_BT=batch.advantages_BT,
        mask_BT=batch.loss_mask_BT,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )
    return policy_loss(logprobs_BT, inputs, PolicyLossSettings())


def learner(model, micro_batch_size):
    settings = OptimSettings(lr=1e-2, micro_batch_size=micro_batch_size)
    return Learner(model, settings, forward=policy_forward(1.0))


def test_micro_batching_gives_the_full_batch_update(tiny):
    batch = collate(TRAJECTORIES, pad_id=PAD, advantages=[1.0, -0.5, 0.25, -1.0])
    whole, split = learner(copy.deepcopy(tiny), 4), learner(copy.deepcopy(tiny), 1)
    m_whole = whole.step(batch, grpo_loss)
    m_split = split.step(batch, grpo_loss)
    assert m_whole["grad_norm"] == pytest.approx(m_split["grad_norm"], rel=1e-4)
    for (name, a), (_, b) in zip(
        whole.model.named_parameters(), split.model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_a_step_moves_the_logprob_of_sampled_tokens_with_the_advantage_sign(tiny, advantage):
    model = copy.deepcopy(tiny)
    batch = collate(TRAJECTORIES[:1], pad_id=PAD, advantages=[advantage])
    on_policy = token_logprobs(model, batch).detach()  # ratio 1: nothing is clipped
    batch = dataclasses.replace(batch, old_logprobs_BT=on_policy)
    before = on_policy.sum()
    learner(model, 1).step(batch, grpo_loss)
    after = token_logprobs(model, batch).detach().sum()
    assert (after - before) * advantage > 0  # +1: more likely; -1: less likely


def test_named_weights_round_trip_into_an_engine_copy(tiny):
    trained = learner(copy.deepcopy(tiny), 2)
    trained.step(collate(TRAJECTORIES, pad_id=PAD, advantages=[1.0, 0.0, 0.0, -1.0]), grpo_loss)
    clone = copy.deepcopy(tiny)
    clone.load_state_dict(dict(trained.named_weights()))
    assert any(
        not torch.equal(a, b) for a, b in zip(tiny.parameters(), clone.parameters(), strict=True)
    )
    for a, b in zip(trained.model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
