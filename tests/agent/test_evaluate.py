"""Evaluation: the unbiased pass@k estimator and aggregation over episodes."""

import dataclasses

import pytest

from palaestra.agent.evaluate import is_success, pass_at_k, summarize
from palaestra.agent.trajectory import StopReason, Trajectory


def test_pass_at_k_by_hand():
    # 5 samples, 2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # only 2 wrong samples: any 3 include a correct one
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def episode(group: int, reward: float, stop=StopReason.ANSWERED, sampled: int = 2) -> Trajectory:
    return Trajectory(
        token_ids=(1,) * (3 + sampled),
        loss_mask=(0, 0, 0) + (1,) * sampled,
        logprobs=(0.0,) * (3 + sampled),
        turns=(),
        reward=reward,
        reward_components={},
        stop_reason=stop,
        policy_version=0,
        group_id=group,
        env_id="e",
        task_id=str(group),
    )


def test_summary_counts_successes_and_leaves_out_infra_failures():
    runs = [episode(0, 1.0), episode(0, 0.0), episode(1, 0.0), episode(1, 0.0)]
    runs.append(episode(1, 0.0, StopReason.ENGINE_ERROR, sampled=0))
    result = summarize(runs, num_tasks=2, samples=2)
    assert result.accuracy == pytest.approx(1 / 4)
    assert result.pass_at[2] == pytest.approx(0.5)  # task 0 solved, task 1 not
    assert result.infra_failures == 1
    assert result.stop_reasons == {"answered": 4, "engine_error": 1}
    assert result.by_category == {}


def test_accuracy_is_broken_down_by_category_when_tasks_carry_one():
    runs = [episode(0, 1.0), episode(1, 0.0), episode(2, 1.0)]
    runs = [
        Trajectory(**{**r.__dict__, "info": {"category": c}})
        for r, c in zip(runs, ["simple", "simple", "parallel"], strict=True)
    ]
    result = summarize(runs, num_tasks=3, samples=1)
    assert result.by_category == {"simple": 0.5, "parallel": 1.0}


def test_an_env_that_reports_success_is_believed_over_its_reward():
    solved, failed = episode(0, 0.0), episode(1, 1.0)  # rewards that say the opposite
    assert is_success(failed) and not is_success(solved)  # no report: a positive reward
    assert is_success(dataclasses.replace(solved, info={"success": True}))
    assert not is_success(dataclasses.replace(failed, info={"success": False}))
