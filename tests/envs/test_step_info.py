"""StepInfo: the typed contract of env info dicts; round trips, and errors naming env and key."""

from __future__ import annotations

from dataclasses import fields

import pytest

from palaestra.envs import make
from palaestra.envs.errors import StepInfoError
from palaestra.envs.step_info import _READERS, EnvStopReason, StepInfo


def test_a_dict_read_and_written_back_keeps_its_keys_and_values() -> None:
    info = {
        "task_id": "t1",
        "reward_components": {"correct": 1.0},
        "success": True,
        "stop_reason": "parse_error",
        "reward_hack": ["exit_early"],
        "tool_calls": 2,
        "parse_errors": 0,
        "answer": "42",
        "turn": 3,
    }

    step = StepInfo.from_info(info)

    assert step.stop_reason is EnvStopReason.PARSE_ERROR and step.reward_hack == ("exit_early",)
    assert step.extra == {"answer": "42", "turn": 3}
    assert step.tool_counts() == {"tool_calls": 2, "parse_errors": 0}
    assert step.to_info() == info


def test_absent_and_none_keys_stay_absent() -> None:
    assert StepInfo.from_info({"error": None}).to_info() == {}
    assert StepInfo(reward_components={}).to_info() == {"reward_components": {}}


@pytest.mark.parametrize(
    ("key", "value", "wanted"),
    [
        ("stop_reason", "gave_up", "one of 'answered', 'max_turns'"),
        ("reward_components", {"correct": "yes"}, "a dict of str names to numbers"),
        ("success", 1, "True or False"),
        ("tool_calls", -1, "a count"),
        ("tools", [{"type": "function"}, "lookup"], "a list of function-tool spec dicts"),
    ],
)
def test_a_wrong_value_names_the_env_and_the_key(key: str, value: object, wanted: str) -> None:
    with pytest.raises(StepInfoError) as caught:
        StepInfo.from_info({key: value}, env="MyEnv")

    assert f"MyEnv returned info[{key!r}] = {value!r}" in str(caught.value)
    assert wanted in str(caught.value)


def test_extra_may_not_repeat_a_typed_key() -> None:
    with pytest.raises(StepInfoError, match="success"):
        StepInfo(extra={"success": True})


def test_every_field_but_extra_has_a_reader_in_field_order() -> None:
    assert list(_READERS) == [f.name for f in fields(StepInfo) if f.name != "extra"]


def test_registered_envs_keep_the_contract() -> None:
    env = make("palaestra/ToolLookup-v0", split="train")
    _, info = env.reset(seed=0)
    opening = StepInfo.from_info(info, env="ToolLookup")
    _, _, _, _, info = env.step("The answer is \\boxed{0}.")
    step = StepInfo.from_info(info, env="ToolLookup")
    env.close()

    assert opening.tools and opening.tool_instructions and opening.task_id
    assert step.success is False and step.reward_components == {"correct": 0.0}
    assert step.tool_counts()["tool_calls"] == 0
