"""collate: one row per training sample, split trajectories included, advantages per row."""

from __future__ import annotations

import pytest
import torch

from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EpisodeRequest, RolloutLimits, run_episode
from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.envs.core import TextEnv
from palaestra.trainer.batch import collate, rows_of_token_values

PAD = 99


def trajectory(tokens: list[int], mask: list[int], segment_starts=(0,)) -> Trajectory:
    return Trajectory(
        token_ids=tuple(tokens),
        loss_mask=tuple(mask),
        logprobs=tuple(-0.1 * t if m else 0.0 for t, m in zip(tokens, mask, strict=True)),
        turns=(),
        reward=0.0,
        reward_components={},
        stop_reason=StopReason.ANSWERED,
        policy_version=0,
        group_id=0,
        env_id="e",
        task_id="t",
        segment_starts=segment_starts,
    )


def test_unsplit_trajectories_make_one_row_each():
    a = trajectory([1, 2, 3, 4], [0, 0, 1, 1])
    b = trajectory([5, 6, 7], [0, 1, 1])

    batch = collate([a, b], pad_id=PAD, advantages=[0.5, -0.5])

    assert batch.input_ids_BT.tolist() == [[1, 2, 3, 4], [5, 6, 7, PAD]]
    assert batch.attention_mask_BT.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.loss_mask_BT.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    # each trajectory's advantage on its sampled tokens
    assert batch.advantages_BT.tolist() == [[0, 0, 0.5, 0.5], [0, -0.5, -0.5, 0]]
    assert batch.episode_B.tolist() == [0, 1]


def test_a_split_trajectory_makes_one_row_per_segment_with_its_advantage():
    split = trajectory([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 1, 0, 0, 0, 1, 1], segment_starts=(0, 3))
    plain = trajectory([9, 10], [0, 1])

    batch = collate([split, plain], pad_id=PAD, advantages=[2.0, -1.0])

    assert batch.input_ids_BT.tolist() == [
        [1, 2, 3, PAD, PAD],
        [4, 5, 6, 7, 8],
        [9, 10, PAD, PAD, PAD],
    ]
    assert batch.loss_mask_BT.tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]
    expected_logprobs = [[0, -0.2, -0.3, 0, 0], [0, 0, 0, -0.7, -0.8], [0, -1.0, 0, 0, 0]]
    assert torch.allclose(batch.old_logprobs_BT, torch.tensor(expected_logprobs))
    assert batch.episode_B.tolist() == [0, 0, 1]
    assert batch.advantages_BT.tolist() == [[0, 2, 2, 0, 0], [0, 0, 0, 2, 2], [0, -1, 0, 0, 0]]
    assert batch.num_loss_tokens == split.num_sampled_tokens + plain.num_sampled_tokens
    kl_B = torch.tensor([0.25, 0.5, 1.0])
    assert batch.sum_per_episode(kl_B, 2).tolist() == [0.75, 1.0]
    micro = batch.micro_batches(2)
    assert [m.episode_B.tolist() for m in micro] == [[0, 0], [1]]
    assert micro[1].input_ids_BT.tolist() == [[9, 10]]


def test_per_token_values_are_laid_out_in_collates_rows():
    split = trajectory([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 1, 0, 0, 0, 1, 1], segment_starts=(0, 3))
    plain = trajectory([9, 10], [0, 1])
    values = [[0, 0.5, 0.5, 0, 0, 0, -1, -1], [0, 2]]

    rows_BT = rows_of_token_values([split, plain], values)

    assert rows_BT.tolist() == [[0, 0.5, 0.5, 0, 0], [0, 0, 0, -1, -1], [0, 2, 0, 0, 0]]
    assert rows_BT.shape == collate([split, plain], pad_id=PAD).input_ids_BT.shape
    with pytest.raises(ValueError, match="2 values for a trajectory of 8 tokens"):
        rows_of_token_values([split], [[0, 1]])


def test_collate_refuses_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 advantages"):
        collate([trajectory([1, 2], [0, 1])], pad_id=PAD, advantages=[0.0, 1.0])
    with pytest.raises(ValueError, match="no trajectories"):
        collate([], pad_id=PAD)


class TwoQuestions(TextEnv):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.asked = 1
        return [{"role": "user", "content": "Say hi."}], {"task_id": "two"}

    def step(self, action):
        if self.asked == 2:
            return [], 1.0, True, False, {}
        self.asked = 2
        return [{"role": "user", "content": "Again?"}], 0.0, False, False, {}


async def test_rows_of_a_split_episode_are_what_the_engine_was_prompted_with(tokenizer):
    stripping = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    stripping.chat_template = (  # drops earlier assistant turns from history
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = [
        [*tokenizer.encode("hi", add_special_tokens=False), end],
        [*tokenizer.encode("yes", add_special_tokens=False), end],
    ]
    engine = FakeEngine(replies, logprobs=-0.5)
    t = await run_episode(
        TwoQuestions(),
        engine,
        ChatRenderer(stripping),
        SamplingParams(),
        EpisodeRequest(0, 0),
        env_id="two",
        limits=RolloutLimits(max_turns=2),
    )

    batch = collate([t], pad_id=tokenizer.pad_token_id)

    assert len(batch) == 2 and batch.episode_B.tolist() == [0, 0]
    for row, (prompt, sampled) in enumerate(zip(engine.prompts, replies, strict=True)):
        n = len(prompt) + len(sampled)
        assert batch.input_ids_BT[row, :n].tolist() == prompt + sampled
        trained = batch.input_ids_BT[row][batch.loss_mask_BT[row].bool()].tolist()
        assert trained == sampled
        assert batch.old_logprobs_BT[row][batch.loss_mask_BT[row].bool()].tolist() == [-0.5] * len(
            sampled
        )
