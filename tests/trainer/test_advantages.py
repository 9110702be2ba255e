"""Group-relative advantages, checked against values worked out by hand."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from palaestra.trainer.advantages import gae, group_advantages, grouped_advantages, rloo_advantages

EPS = 1e-6


def test_grpo_advantage_is_reward_minus_mean_over_unbiased_std():
    # rewards 1, 3, 5: mean 3, deviations -2, 0, 2,
    # unbiased variance (4 + 0 + 4) / (3 - 1) = 4, std 2.
    rewards_G = torch.tensor([1.0, 3.0, 5.0])
    expected_G = torch.tensor([-2 / (2 + EPS), 0.0, 2 / (2 + EPS)])
    torch.testing.assert_close(group_advantages(rewards_G, eps=EPS), expected_G)


def test_grpo_advantage_on_binary_rewards():
    # rewards 0, 0, 1, 1: mean 0.5, deviations ±0.5,
    # unbiased variance 4 * 0.25 / 3 = 1/3, std 1/sqrt(3), advantage ±0.5 * sqrt(3).
    rewards_G = torch.tensor([0.0, 1.0, 0.0, 1.0])
    a = 0.5 / (1 / math.sqrt(3) + EPS)
    torch.testing.assert_close(group_advantages(rewards_G), torch.tensor([-a, a, -a, a]))


def test_dr_grpo_advantage_is_reward_minus_mean():
    rewards_G = torch.tensor([1.0, 3.0, 5.0])
    advantages_G = group_advantages(rewards_G, scale_by_std=False)
    torch.testing.assert_close(advantages_G, torch.tensor([-2.0, 0.0, 2.0]))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_of_equal_rewards_has_zero_advantages_not_nan(scale_by_std):
    advantages_G = group_advantages(torch.full((4,), 0.7), scale_by_std=scale_by_std)
    torch.testing.assert_close(advantages_G, torch.zeros(4))


def test_group_of_one_has_zero_advantage():
    torch.testing.assert_close(group_advantages(torch.tensor([3.0])), torch.zeros(1))


def test_integer_rewards_give_float_advantages():
    advantages_G = group_advantages(torch.tensor([0, 2]), scale_by_std=False)
    torch.testing.assert_close(advantages_G, torch.tensor([-1.0, 1.0]))


def test_grouped_advantages_normalises_each_group_on_its_own():
    # group 7 (positions 0, 2, 4): rewards 1, 3, 5 -> -1, 0, 1 (see the first test)
    # group 3 (positions 1, 3):    rewards 0, 1 -> mean 0.5, unbiased std sqrt(0.5) -> ±0.5/sqrt(0.5)
    # group 9 (position 5):        one completion -> 0
    rewards_N = torch.tensor([1.0, 0.0, 3.0, 1.0, 5.0, 8.0])
    group_ids_N = torch.tensor([7, 3, 7, 3, 7, 9])
    b = 0.5 / (math.sqrt(0.5) + EPS)
    expected_N = torch.tensor([-2 / (2 + EPS), -b, 0.0, b, 2 / (2 + EPS), 0.0])
    torch.testing.assert_close(grouped_advantages(rewards_N, group_ids_N), expected_N)


def test_grouped_dr_grpo_advantages_only_subtract_the_group_mean():
    rewards_N = torch.tensor([1.0, 0.0, 3.0, 1.0, 5.0, 8.0])
    group_ids_N = torch.tensor([7, 3, 7, 3, 7, 9])
    advantages_N = grouped_advantages(rewards_N, group_ids_N, scale_by_std=False)
    torch.testing.assert_close(advantages_N, torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0, 0.0]))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grouped_matches_group_advantages_on_every_group(scale_by_std):
    generator = torch.Generator().manual_seed(0)
    sizes = [1, 2, 5, 8]
    rewards_N = torch.randn(sum(sizes), generator=generator, dtype=torch.float64)
    group_ids_N = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    shuffle = torch.randperm(len(rewards_N), generator=generator)
    rewards_N, group_ids_N = rewards_N[shuffle], group_ids_N[shuffle]

    advantages_N = grouped_advantages(rewards_N, group_ids_N, scale_by_std=scale_by_std)

    for group in range(len(sizes)):
        in_group = group_ids_N == group
        expected = group_advantages(rewards_N[in_group], scale_by_std=scale_by_std)
        torch.testing.assert_close(advantages_N[in_group], expected)


def test_all_equal_groups_in_a_flat_batch_have_zero_advantages():
    rewards_N = torch.tensor([1.0, 1.0, 0.0, 0.0])
    advantages_N = grouped_advantages(rewards_N, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(advantages_N, torch.zeros(4))


@pytest.mark.parametrize(
    ("rewards", "match"),
    [(torch.zeros(2, 2), "rewards_G must be a non-empty 1-D"), (torch.zeros(0), "non-empty")],
)
def test_group_advantages_rejects_bad_rewards(rewards, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards)


def test_zero_eps_is_rejected_when_scaling_by_std():
    with pytest.raises(ValueError, match="eps must be > 0"):
        group_advantages(torch.ones(3), eps=0.0)


def test_grouped_advantages_rejects_mismatched_or_float_group_ids():
    with pytest.raises(ValueError, match="group_ids_N must have the shape of rewards_N"):
        grouped_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        grouped_advantages(torch.zeros(4), torch.zeros(4))


# --------------------------------------------------------------------------- against TRL 1.16


class _OneProcessAccelerator:
    """The members of ``accelerate.Accelerator`` that TRL's scoring step reads, one process."""

    device = torch.device("cpu")
    process_index = 0

    def gather(self, tensor):
        return tensor


def _trl_advantages(rewards_N: torch.Tensor, num_generations: int, scale_rewards: str):
    """Run TRL's own ``GRPOTrainer._generate_and_score_completions`` on fixed rewards.

    ``self`` is a stand-in carrying only what that method reads in TRL 1.16 for a text-only,
    single-process, no-vLLM, no-tools, ``beta=0`` step; generation returns two fixed tokens
    per completion and the reward functions return ``rewards_N``. Everything between,
    including the group mean/std and the advantage, is TRL's code.
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    N = len(rewards_N)
    trainer = types.SimpleNamespace(
        accelerator=_OneProcessAccelerator(),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        args=types.SimpleNamespace(
            per_device_train_batch_size=N,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
        ),
        environment_factories=None,
        environments=None,
        tools=None,
        _tokenizer=types.SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        num_iterations=1,
        use_vllm=False,
        beta=0.0,
        num_generations=num_generations,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1),
        reward_func_names=["reward"],
        scale_rewards=scale_rewards,
        _metrics={"train": defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
    )
    trainer._generate = lambda prompts: (
        [[1]] * N,  # prompt ids
        [[2, 3]] * N,  # completion ids
        None,  # tool mask
        ["completion"] * N,
        None,  # sampling logprobs
        {},  # extra fields
        None,  # images
        None,  # tool images
    )
    trainer._calculate_rewards = lambda *args: rewards_N.unsqueeze(-1)
    inputs = [{"prompt": f"prompt {n // num_generations}"} for n in range(N)]
    return GRPOTrainer._generate_and_score_completions(trainer, inputs)["advantages"]


@pytest.mark.parametrize(("scale_rewards", "scale_by_std"), [("group", True), ("none", False)])
def test_matches_trl_grpo_advantages(scale_rewards, scale_by_std):
    """TRL groups the ``num_generations`` consecutive completions of each prompt and uses the
    same unbiased std, but adds ``1e-4`` to it (so ``eps=1e-4`` here). TRL's
    ``scale_rewards="batch"`` (one std over the whole batch) has no counterpart here."""
    pytest.importorskip("trl.trainer.grpo_trainer")
    generator = torch.Generator().manual_seed(0)
    rewards_N = torch.cat(
        [
            torch.randn(4, generator=generator),
            torch.tensor([1.0, 0.0, 0.0, 1.0]),
            torch.full((4,), 0.5),  # all equal: TRL and we give 0
        ]
    )
    group_ids_N = torch.arange(3).repeat_interleave(4)

    theirs_N = _trl_advantages(rewards_N, num_generations=4, scale_rewards=scale_rewards)
    ours_N = grouped_advantages(rewards_N, group_ids_N, scale_by_std=scale_by_std, eps=1e-4)

    torch.testing.assert_close(ours_N, theirs_N)
    torch.testing.assert_close(ours_N[8:], torch.zeros(4))


def test_turn_advantages_credit_each_turn_with_its_return_to_go_against_its_turn_index():
    from palaestra.trainer.advantages import grouped_turn_advantages

    # group 0: A has step rewards [0, 1], B [0, 0, 0], C [1]; group 1: D [0.5] alone
    returns_to_go = [[1.0, 1.0], [0.0, 0.0, 0.0], [1.0], [0.5]]
    groups = torch.tensor([0, 0, 0, 1])

    centered = grouped_turn_advantages(returns_to_go, groups, scale_by_std=False)
    scaled = grouped_turn_advantages(returns_to_go, groups, eps=1e-9)

    # turn 0 baseline: mean(1, 0, 1) = 2/3; turn 1: mean(1, 0) = 1/2; turn 2: B alone
    expected = [[1 / 3, 1 / 2], [-2 / 3, -1 / 2, 0.0], [1 / 3], [0.0]]
    for got, want in zip(centered, expected, strict=True):
        assert got.tolist() == pytest.approx(want, abs=1e-6)
    std = (((1 / 3) ** 2 + (2 / 3) ** 2 + (1 / 3) ** 2) / 2) ** 0.5  # of episode returns 1, 0, 1
    for got, want in zip(scaled[:3], expected[:3], strict=True):
        assert got.tolist() == pytest.approx([w / std for w in want], abs=1e-6)
    assert scaled[3].tolist() == [0.0]


def test_turn_advantages_of_single_turn_episodes_are_grpo_advantages():
    from palaestra.trainer.advantages import grouped_turn_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.2, 0.9, 0.9])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])

    per_turn = grouped_turn_advantages([[r] for r in rewards.tolist()], groups)

    assert torch.cat(per_turn) == pytest.approx(grouped_advantages(rewards, groups), abs=1e-6)


def test_rloo_baseline_is_the_mean_of_the_other_completions():
    from palaestra.trainer.advantages import rloo_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1])

    # group 0: 1 - (0 + 0)/2 = 1, 0 - (1 + 0)/2 = -0.5 twice; group 1: 2 - 5, 5 - 2
    assert rloo_advantages(rewards, groups).tolist() == pytest.approx([1.0, -0.5, -0.5, -3.0, 3.0])
    assert rloo_advantages(torch.tensor([4.0]), torch.tensor([7])).tolist() == [0.0]


def test_reinforce_pp_centres_per_group_then_whitens_over_the_batch():
    from palaestra.trainer.advantages import reinforce_pp_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # centred: [2/3, -1/3, -1/3, -2, 1, 1] (mean 0); unbiased std over the batch
    centred = [2 / 3, -1 / 3, -1 / 3, -2.0, 1.0, 1.0]
    std = math.sqrt(sum(c * c for c in centred) / 5)

    advantages = reinforce_pp_advantages(rewards, groups, eps=1e-12)

    assert advantages.tolist() == pytest.approx([c / std for c in centred])


def test_soft_overlong_penalty_ramps_over_the_buffer():
    from palaestra.trainer.advantages import overlong_penalty

    lengths = torch.tensor([10, 16, 17, 18, 20, 21])
    # max 20, buffer 4: free up to 16, then -(L - 16) / 4, then -1 past 20
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]

    assert overlong_penalty(lengths, max_length=20, buffer=4).tolist() == pytest.approx(expected)
    halved = overlong_penalty(lengths, max_length=20, buffer=4, factor=0.5)
    assert halved.tolist() == pytest.approx([x / 2 for x in expected])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_length=20, buffer=0)


# --- RLOO against TRL ----------------------------------------------------------------------


def _trl_rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Run the lines of TRL 1.16's ``RLOOTrainer`` that turn rewards into advantages.

    They sit inline in ``_generate_and_score_completions``, after generation and reward
    calls that need a real model; the block is taken from TRL's source as installed, from
    ``grouped_rewards = ...`` to the final ``nan_to_num``, and executed on ``rewards``.
    """
    import inspect
    import textwrap
    import types

    from trl.trainer.rloo_trainer import RLOOTrainer
    from trl.trainer.utils import nanstd

    source = inspect.getsource(RLOOTrainer._generate_and_score_completions)
    start = source.index("grouped_rewards = rewards.view(-1, num_generations)")
    end_marker = "advantages = torch.nan_to_num(advantages, nan=0.0)"
    end = source.index(end_marker, start) + len(end_marker)
    block = textwrap.dedent(" " * 8 + source[start:end])
    scope = {
        "rewards": rewards,
        "num_generations": num_generations,
        "torch": torch,
        "nanstd": nanstd,
        "self": types.SimpleNamespace(normalize_advantages=False),
    }
    exec(compile(block, "trl-rloo-advantages", "exec"), scope)
    return scope["advantages"]


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_matches_trl(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (12,), generator=g).float()  # 3 prompts x 4 completions
    group_ids = torch.arange(3).repeat_interleave(4)
    torch.testing.assert_close(
        rloo_advantages(rewards, group_ids), _trl_rloo_advantages(rewards, 4)
    )


# --- GAE -----------------------------------------------------------------------------------


def test_gae_by_hand_over_model_tokens_with_a_tool_reply_between_turns():
    # positions: 0 prompt | 1, 2 turn one | 3, 4 tool reply | 5, 6 turn two | 7 padding
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 9.0, 9.0, 0.6, 0.8, 9.0]])  # 9s are never read
    rewards = torch.tensor(
        [[0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 1.0, 0.0]]
    )  # turn rewards on last tokens
    gamma, lam = 0.9, 0.8
    # backwards over the model tokens 6, 5, 2, 1 (the tool reply is not a step):
    d6 = 1.0 + 0.9 * 0.0 - 0.8  # = 0.2, the episode ends after token 6
    a6 = d6
    d5 = 0.0 + 0.9 * 0.8 - 0.6  # = 0.12
    a5 = d5 + 0.9 * 0.8 * a6  # = 0.264
    d2 = 0.2 + 0.9 * 0.6 - 0.4  # = 0.34, bootstraps from token 5 across the tool reply
    a2 = d2 + 0.72 * a5  # = 0.53008
    d1 = 0.0 + 0.9 * 0.4 - 0.5  # = -0.14
    a1 = d1 + 0.72 * a2  # = 0.2416576
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.tensor([[0.0, a1, a2, 0.0, 0.0, a5, a6, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.where(mask.bool(), expected + values, 0.0))


def test_gae_limits_are_monte_carlo_and_one_step_td():
    mask = torch.tensor([[1, 1, 1, 0]])
    values = torch.tensor([[0.3, 0.1, 0.7, 0.0]])
    rewards = torch.tensor([[0.5, 0.0, 2.0, 0.0]])
    mc, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = gamma = 1: the rewards still to come, minus the value
    torch.testing.assert_close(mc, torch.tensor([[2.5 - 0.3, 2.0 - 0.1, 2.0 - 0.7, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.5, 2.0, 2.0, 0.0]]))
    td, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    # lam = 0: r_t + gamma V_t+1 - V_t
    torch.testing.assert_close(
        td, torch.tensor([[0.5 + 0.05 - 0.3, 0.0 + 0.35 - 0.1, 2.0 - 0.7, 0.0]])
    )
    with pytest.raises(ValueError, match="gamma and lam"):
        gae(rewards, values, mask, gamma=1.5, lam=0.9)
