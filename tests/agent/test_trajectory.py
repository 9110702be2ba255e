"""Trajectory records: stop-reason taxonomy, segment invariants, per-turn returns."""

from __future__ import annotations

import dataclasses

import pytest

from palaestra.agent.trajectory import StopReason, Trajectory, Turn
from palaestra.envs.step_info import EnvStopReason


def test_every_reason_an_env_may_report_is_a_stop_reason():
    reported = {reason.value for reason in EnvStopReason}
    assert reported == {"answered", "max_turns", "parse_error", "tool_error", "env_error"}
    assert reported < {reason.value for reason in StopReason}


def trajectory(mask: list[int], *, segment_starts=(0,), turns=()) -> Trajectory:
    return Trajectory(
        token_ids=tuple(range(len(mask))),
        loss_mask=tuple(mask),
        logprobs=tuple(-1.0 * m for m in mask),
        turns=tuple(turns),
        reward=sum(turn.reward for turn in turns),
        reward_components={},
        stop_reason=StopReason.ANSWERED,
        policy_version=0,
        group_id=0,
        env_id="e",
        task_id="t",
        segment_starts=segment_starts,
    )


def test_the_stop_reasons_are_a_closed_set_with_four_infrastructure_failures():
    assert {r.value for r in StopReason} == {
        "answered",
        "max_turns",
        "max_tokens",
        "timeout",
        "parse_error",
        "tool_error",
        "env_error",
        "engine_error",
    }
    assert {r.value for r in StopReason if r.is_infra_failure} == {
        "timeout",
        "tool_error",
        "env_error",
        "engine_error",
    }


def test_segments_cover_the_tokens_in_order():
    t = trajectory([0, 0, 1, 1, 0, 0, 1], segment_starts=(0, 4))
    assert t.is_split and t.segments == [(0, 4), (4, 7)]
    assert not trajectory([0, 1]).is_split and trajectory([0, 1]).segments == [(0, 2)]


@pytest.mark.parametrize(
    "starts",
    [(), (1,), (0, 0), (0, 5, 3), (0, 7), (0, 2)],  # (0, 2): that segment opens on a sampled token
)
def test_bad_segment_starts_are_refused(starts):
    with pytest.raises(ValueError, match="segment"):
        trajectory([0, 0, 1, 1, 0, 0, 1], segment_starts=starts)


def test_returns_to_go_sum_the_rewards_of_this_turn_and_later_ones():
    turns = [Turn(1, 3, "a", "stop", reward=0.5), Turn(4, 5, "b", "stop", reward=2.0)]
    t = trajectory([0, 1, 1, 0, 1], turns=turns)
    assert t.turn_returns_to_go() == (2.5, 2.0)
    assert t.returns_to_go() == (0.0, 2.5, 2.5, 0.0, 2.0)
    assert t.reward == 2.5
    assert t.per_token([-1.0, 3.0]) == (0.0, -1.0, -1.0, 0.0, 3.0)
    with pytest.raises(ValueError, match="1 values for 2 turns"):
        t.per_token([1.0])


def test_step_info_reads_the_last_info_typed():
    t = dataclasses.replace(trajectory([0, 1]), info={"success": True, "tool_calls": 2, "x": 1})
    assert t.step_info.success is True and t.step_info.tool_counts() == {"tool_calls": 2}
    assert t.step_info.extra == {"x": 1}
