"""BFCL: the AST-style scorer by hand, and every category's ground truth scored back."""

from __future__ import annotations

import importlib.util

import pytest

from palaestra.envs import EnvConfigError, HermesFormat, JsonFormat, ToolCall, make
from palaestra.envs.bfcl import (
    CATEGORIES,
    IRRELEVANCE,
    BFCLEnv,
    BFCLItem,
    gold_calls,
    load_category,
    mismatch,
    openai_tool,
    value_matches,
)

needs_bfcl = pytest.mark.skipif(
    importlib.util.find_spec("bfcl_eval") is None,
    reason="bfcl-eval is not installed (pip install --no-deps bfcl-eval)",
)

AREA = {
    "name": "geometry.area",
    "description": "Area of a shape.",
    "parameters": {
        "type": "dict",
        "properties": {
            "shape": {"type": "string"},
            "size": {"type": "float"},
            "unit": {"type": "string"},
            "options": {"type": "dict", "properties": {"round": {"type": "boolean"}}},
            "sides": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["shape", "size"],
    },
}


def item(category: str, *answers) -> BFCLItem:
    return BFCLItem("t_0", category, ({"role": "user", "content": "q"},), (AREA,), answers)


ANSWER = {"geometry.area": {"shape": ["square"], "size": [2.0], "unit": ["cm", ""]}}


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"shape": "Square", "size": 2}, None),  # case-insensitive; int for float; unit optional
        ({"shape": "square", "size": 2.0, "unit": "c.m"}, None),  # ",./-_*^" and spaces ignored
        ({"shape": "circle", "size": 2.0}, "argument 'shape'='circle' is not one of ['square']"),
        ({"shape": "square"}, "missing required argument 'size'"),
        ({"shape": "square", "size": 2.0, "color": "red"}, "unexpected argument 'color'"),
        ({"shape": "square", "size": "2"}, "argument 'size'='2' is not one of [2.0]"),
    ],
)
def test_simple_call_scoring(arguments: dict, reason: str | None) -> None:
    found = mismatch([ToolCall("geometry.area", arguments)], item("simple", ANSWER))

    assert found == (None if reason is None else f"geometry.area: {reason}")


def test_wrong_name_and_wrong_count() -> None:
    assert mismatch([ToolCall("area", {})], item("simple", ANSWER)) == (
        "called 'area', expected 'geometry.area'"
    )
    assert mismatch([], item("simple", ANSWER)) == "expected 1 call(s), got 0"


def test_parallel_calls_match_in_any_order() -> None:
    second = {"geometry.area": {"shape": ["circle", "disc"], "size": [1.0], "unit": [""]}}
    parallel = item("parallel", ANSWER, second)
    square = ToolCall("geometry.area", {"shape": "square", "size": 2.0})
    circle = ToolCall("geometry.area", {"shape": "disc", "size": 1.0})

    assert mismatch([circle, square], parallel) is None
    assert mismatch([square, square], parallel) == (
        "no call matches expected call 2 (geometry.area: argument 'shape'='square' is not one "
        "of ['circle', 'disc'])"
    )


def test_irrelevance_succeeds_only_without_calls() -> None:
    assert mismatch([], item("irrelevance")) is None
    assert mismatch([ToolCall("geometry.area", {})], item("irrelevance")) == (
        "no function fits this question, but the model called geometry.area"
    )


@pytest.mark.parametrize(
    ("value", "allowed", "bfcl_type", "matches"),
    [
        ({"round": True}, [{"round": [True]}], "dict", True),
        ({}, [{"round": [True, ""]}], "dict", True),
        ({"round": False}, [{"round": [True]}], "dict", False),
        ({"round": True, "x": 1}, [{"round": [True]}], "dict", False),
        ([1, 2], [[1, 2], [2, 1]], "array", True),
        ([1, 3], [[1, 2]], "array", False),
        (["New York, NY"], [["new york ny"]], "array", True),
        ([{"a": "X"}], [[{"a": ["x"]}]], "array", True),
        (True, [1], "integer", False),  # a bool is not an integer
        ("num_items", ["num_items"], "integer", True),  # the answer names a variable
        (3, [3], "float", True),
    ],
)
def test_value_rules(value, allowed, bfcl_type: str, matches: bool) -> None:
    assert value_matches(value, allowed, bfcl_type) is matches


def test_bfcl_types_become_json_schema() -> None:
    parameters = openai_tool(AREA)["function"]["parameters"]

    assert parameters["type"] == "object"
    assert parameters["properties"]["size"] == {"type": "number"}
    assert parameters["properties"]["options"]["type"] == "object"


def test_train_split_is_refused() -> None:
    with pytest.raises(EnvConfigError, match="BFCL is an evaluation set"):
        BFCLEnv(split="train")


def test_unknown_category() -> None:
    with pytest.raises(EnvConfigError, match="unknown BFCL category 'simple_java'"):
        load_category("simple_java")


# ------------------------------------------------------------------------- the real data


def _perturb(call: ToolCall) -> ToolCall:
    """The call with one argument changed to a value no answer allows (or one added)."""
    if not call.arguments:
        return ToolCall(call.name, {"surely_not_a_parameter": 1})
    name, value = next(iter(call.arguments.items()))
    if isinstance(value, bool):
        changed = not value
    elif isinstance(value, (int, float)):
        changed = value + 7919
    elif isinstance(value, str):
        changed = value + " zzq"
    elif isinstance(value, list):
        changed = [*value, "zzq"]
    elif isinstance(value, dict):
        changed = {**value, "zzq": "zzq"}
    else:  # null
        changed = "zzq"
    return ToolCall(call.name, {**call.arguments, name: changed})


@needs_bfcl
@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("fmt", [HermesFormat(), JsonFormat()], ids=["hermes", "json"])
def test_ground_truth_scores_back(category: str, fmt) -> None:
    env = BFCLEnv(category, tool_format=fmt)
    scores = []
    for index in range(env.num_tasks):
        _, info = env.reset(options={"task_index": index})
        calls = gold_calls(env.items[index])
        reply = fmt.render(calls) if calls else "None of these functions fits the question."
        scores.append(env.step(reply)[1])

    assert info["category"] == category
    assert sum(scores) / len(scores) >= 0.99, f"{category}: {sum(scores)}/{len(scores)}"


@needs_bfcl
@pytest.mark.parametrize("category", sorted(set(CATEGORIES) - IRRELEVANCE))
def test_perturbed_name_or_argument_scores_zero(category: str) -> None:
    fmt = HermesFormat()
    env = BFCLEnv(category)
    for index in range(env.num_tasks):
        calls = gold_calls(env.items[index])
        renamed = [ToolCall(calls[0].name + "_v2", calls[0].arguments), *calls[1:]]
        changed = [_perturb(calls[0]), *calls[1:]]
        for wrong in (renamed, changed):
            env.reset(options={"task_index": index})
            _, reward, *_ = env.step(fmt.render(wrong))
            assert reward == 0.0, f"{env.items[index].item_id}: {wrong}"


@needs_bfcl
def test_registered_env_offers_the_question_and_tools() -> None:
    env = make("palaestra/BFCL-v0", categories="simple")
    messages, info = env.reset(options={"task_index": 0})

    assert info["task_id"] == "simple_python_0" and info["split"] == "test"
    assert messages[-1]["role"] == "user" and info["tools"][0]["type"] == "function"
    assert info["tools"][0]["function"]["parameters"]["type"] == "object"
    _, reward, terminated, _, info = env.step("I cannot call anything.")
    assert (reward, terminated, info["success"]) == (0.0, True, False)
    assert info["mismatch"] == "expected 1 call(s), got 0"
