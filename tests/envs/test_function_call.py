"""FunctionCallEnv: the solver scores 1, perturbed calls score 0, splits are disjoint."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from palaestra.envs import (
    EnvConfigError,
    FunctionCallEnv,
    FunctionCallTask,
    FunctionCallTasks,
    GoldCall,
    ResetNeededError,
    TaskSourceError,
    ToolCall,
    call_mismatch,
    check_env,
    make,
    solver_of,
)
from palaestra.envs.function_call import CATEGORY_WEIGHTS
from palaestra.envs.function_catalog import CATALOG, value_text

CATEGORIES = list(CATEGORY_WEIGHTS)
CALL_CATEGORIES = [c for c in CATEGORIES if c != "irrelevance"]
TASKS = 200
JSON_TYPES = {"string", "integer", "number", "boolean", "array", "object"}


def _tasks(split: str, category: str, count: int = TASKS) -> list[FunctionCallTask]:
    tasks = FunctionCallTasks(split, category=category)
    return [tasks[i] for i in range(count)]


def _play(env: FunctionCallEnv, index: int, reply: Callable[[FunctionCallTask], str]):
    """Open task ``index``, reply with ``reply(task)``; the step's reward and info."""
    env.reset(options={"task_index": index})
    _, reward, terminated, truncated, info = env.step(reply(env.task))
    assert (terminated, truncated) == (True, False)
    return reward, info


# ---------------------------------------------------------------------------- solver


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("category", CATEGORIES)
def test_the_solver_scores_every_task(split: str, category: str) -> None:
    env = FunctionCallEnv(split=split, category=category)

    for index in range(TASKS):
        env.reset(options={"task_index": index})
        task = env.task
        _, reward, _, _, info = env.step(env.expert_action())

        assert (reward, info["success"], info["mismatch"]) == (1.0, True, None), task
        assert info["reward_components"] == {"correct": 1.0, "format": 0.0}
        assert info["category"] == category and info["parse_errors"] == 0
        assert info["tool_calls"] == len(task.gold)


@pytest.mark.parametrize("tool_format", ["hermes", "json"])
def test_the_solver_writes_the_env_format(tool_format: str) -> None:
    env = make("palaestra/FunctionCall-v0", split="test", tool_format=tool_format)

    assert solver_of(env) is env
    for index in range(50):
        reward, _ = _play(env, index, lambda task: env.expert_action())
        assert reward == 1.0


def test_irrelevance_reply_says_no_function_fits() -> None:
    env = FunctionCallEnv(split="test", category="irrelevance")
    env.reset(seed=0)

    reply = env.expert_action()

    assert reply.startswith("None of the available functions (") and "<tool_call>" not in reply


def test_expert_action_needs_an_open_episode() -> None:
    with pytest.raises(ResetNeededError):
        FunctionCallEnv().expert_action()


# ---------------------------------------------------------------------- perturbations


def _changed(value: Any) -> Any:
    """A value the checker must not accept in place of ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + " Annex"
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else [*value, "Extra"]
    key = next(iter(value))
    return {**value, key: _changed(value[key])}


def _perturbations(task: FunctionCallTask) -> Iterator[tuple[str, list[ToolCall]]]:
    """Wrong replies to a task with gold calls, by what is wrong."""
    calls = task.gold_calls
    first, rest = calls[0], calls[1:]
    for key, value in first.arguments.items():
        yield (
            f"wrong {key}",
            [ToolCall(first.name, {**first.arguments, key: _changed(value)}), *rest],
        )
        dropped = {k: v for k, v in first.arguments.items() if k != key}
        yield f"missing {key}", [ToolCall(first.name, dropped), *rest]
    yield "unknown argument", [ToolCall(first.name, {**first.arguments, "notes": "x"}), *rest]
    others = [f["name"] for f in task.functions if f["name"] != first.name] or ["other_function"]
    yield "wrong function", [ToolCall(others[0], first.arguments), *rest]
    yield "no call", []
    yield "extra call", [*calls, calls[0]]
    if len(calls) > 1:
        yield "dropped call", calls[1:]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("category", CALL_CATEGORIES)
def test_perturbed_calls_score_zero(split: str, category: str) -> None:
    env = FunctionCallEnv(split=split, category=category)

    for index in range(TASKS):
        env.reset(options={"task_index": index})
        task = env.task
        for what, calls in _perturbations(task):
            env.reset(options={"task_index": index})
            _, reward, _, _, info = env.step(env.format.render(calls, "Calling."))
            assert reward == 0.0 and not info["success"], (what, task)
            assert info["mismatch"], (what, task)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_call_on_an_irrelevance_task_scores_zero(split: str) -> None:
    env = FunctionCallEnv(split=split, category="irrelevance")

    for index in range(TASKS):
        reward, info = _play(
            env, index, lambda task: env.format.render([ToolCall(task.functions[0]["name"], {})])
        )
        assert reward == 0.0 and info["mismatch"].startswith("no offered function fits")


def test_a_malformed_call_scores_zero_and_counts_as_a_parse_error() -> None:
    env = FunctionCallEnv(split="test")

    for index in range(20):
        reward, info = _play(env, index, lambda task: '<tool_call>{"name": </tool_call>')
        assert (reward, info["parse_errors"], info["tool_calls"]) == (0.0, 1, 0)
        assert info["reward_components"]["format"] == 0.0
        assert info["mismatch"].startswith("unreadable call: tool call 1 is not valid JSON")

    # the gold calls next to an unreadable one still score 0
    env.reset(options={"task_index": 0})
    reply = env.expert_action() + "\n<tool_call>not json</tool_call>"
    _, reward, _, _, info = env.step(reply)
    assert (reward, info["parse_errors"]) == (0.0, 1)


def test_format_reward_is_added_for_a_readable_call() -> None:
    env = FunctionCallEnv(split="test", category="simple", format_reward=0.1)
    env.reset(options={"task_index": 0})
    wrong = ToolCall("not_offered", {})

    _, reward, _, _, info = env.step(env.format.render([wrong]))

    assert reward == pytest.approx(0.1) and info["unknown_tools"] == 1


# --------------------------------------------------------------------- call_mismatch

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "hourly": {"type": "boolean", "default": False},
        "note": {"type": "string"},
        "to": {"type": "array", "items": {"type": "string"}},
        "guest": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
            "required": ["name", "email"],
        },
    },
    "required": ["city"],
}
GOLD = GoldCall("forecast", {"city": "New York", "days": 3, "hourly": True}, WEATHER)


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"city": " new  york", "days": 3.0, "hourly": True}, None),  # case, spaces, 3.0 == 3
        ({"city": "New York", "days": 3, "hourly": True, "units": "celsius"}, None),  # default
        ({"city": "New York", "days": 3, "hourly": True, "units": "Celsius"}, "'units'="),
        ({"city": "New York", "days": 3, "hourly": True, "units": "fahrenheit"}, "not asked"),
        ({"city": "New York", "days": 3, "hourly": True, "note": "x"}, "not asked for"),
        ({"city": "New York", "days": 3, "hourly": 1}, "'hourly'=1 should be True"),
        ({"city": "New York", "days": "3", "hourly": True}, "'days'='3' should be 3"),
        ({"days": 3, "hourly": True}, "missing required argument 'city'"),
        ({"city": "New York", "hourly": True}, "'days' is missing"),
        ({"city": "New York", "days": 3, "hourly": True, "zip": 1}, "unknown argument 'zip'"),
    ],
)
def test_call_mismatch_rules(arguments: dict[str, Any], reason: str | None) -> None:
    found = call_mismatch([ToolCall("forecast", arguments)], [GOLD])

    if reason is None:
        assert found is None
    else:
        assert reason in found


def test_enums_are_exact_and_nested_objects_checked_key_by_key() -> None:
    gold = GoldCall("book", {"city": "Oslo", "units": "fahrenheit", "guest": {"name": "Ana", "email": "a@x.io"}}, WEATHER)  # fmt: skip

    def reply(**changes: Any) -> str | None:
        return call_mismatch([ToolCall("book", {**gold.arguments, **changes})], [gold])

    assert reply() is None and reply(guest={"name": "ANA", "email": "a@x.io"}) is None
    assert "'units'='Fahrenheit'" in reply(units="Fahrenheit")
    assert "unknown argument 'guest.phone'" in reply(guest={**gold.arguments["guest"], "phone": 1})
    assert "missing required argument 'guest.email'" in reply(guest={"name": "Ana"})


def test_parallel_calls_match_in_any_order_and_arrays_in_order() -> None:
    lima = GoldCall("forecast", {"city": "Lima", "to": ["Ana", "Ben"]}, WEATHER)
    calls = [
        ToolCall("forecast", {"city": "Lima", "to": ["ana", "ben"]}),
        ToolCall(GOLD.name, GOLD.arguments),
    ]

    assert call_mismatch(calls, [GOLD, lima]) is None
    assert call_mismatch(calls[::-1], [GOLD, lima]) is None
    swapped = ToolCall("forecast", {"city": "Lima", "to": ["Ben", "Ana"]})
    assert "'to'=" in call_mismatch([swapped, calls[1]], [GOLD, lima])
    assert call_mismatch([calls[1], calls[1]], [GOLD, lima]) is not None
    assert call_mismatch([], []) is None and "expected 2 call(s), got 1" in call_mismatch(calls[:1], [GOLD, lima])  # fmt: skip


# ------------------------------------------------------------------------ the tasks


def test_splits_are_disjoint_across_categories() -> None:
    test_requests = {t.request for c in [*CATEGORIES, "all"] for t in _tasks("test", c)}
    train = [t for c in [*CATEGORIES, "all"] for t in _tasks("train", c, 1000)]

    assert not test_requests & {t.request for t in train}
    assert len(test_requests) > 0.95 * TASKS * len(CATEGORIES)  # requests rarely repeat


def test_tasks_are_deterministic_and_seeds_differ() -> None:
    for split in ("train", "test"):
        assert _tasks(split, "all", 50) == _tasks(split, "all", 50)
    other_seed = FunctionCallTasks("test", seed=1)
    assert [t.request for t in _tasks("test", "all", 50)] != [
        other_seed[i].request for i in range(50)
    ]


def test_the_mix_follows_the_category_weights() -> None:
    counts = collections.Counter(task.category for task in _tasks("train", "all", 2000))

    for category, weight in CATEGORY_WEIGHTS.items():
        assert abs(counts[category] / 2000 - weight) < 0.04, counts


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        yield from (leaf for item in value for leaf in _leaves(item))
    else:
        yield value


@pytest.mark.parametrize("category", CALL_CATEGORIES)
def test_the_request_states_every_value_the_gold_calls_need(category: str) -> None:
    for task in _tasks("test", category) + _tasks("train", category):
        for gold in task.gold:
            for leaf in _leaves(gold.arguments):
                if not isinstance(leaf, bool):  # stated as a phrase ("marked as urgent")
                    assert value_text(leaf) in task.request, (leaf, task.request)


SHAPES = {  # category: (functions offered, calls)
    "simple": ({1}, {1}),
    "multiple": ({2, 3, 4, 5}, {1}),
    "parallel": ({1}, {2, 3}),
    "parallel_multiple": ({2, 3, 4, 5}, {2, 3}),
    "irrelevance": ({1, 2, 3, 4}, {0}),
}


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_category_has_its_shape(category: str) -> None:
    clauses = {name: blueprint.clause for blueprint in CATALOG for name in blueprint.names}
    offered_counts, call_counts = SHAPES[category]
    for task in _tasks("test", category):
        names = [function["name"] for function in task.functions]
        called = [gold.name for gold in task.gold]
        assert len(names) in offered_counts and len(called) in call_counts, task
        assert set(called) <= set(names)
        if category == "parallel_multiple":
            assert len(set(called)) == len(called)
        if category == "irrelevance":  # no offered function's request phrase is in it
            assert not [name for name in names if clauses[name] in task.request], task


def _schema_problems(schema: dict[str, Any], where: str) -> Iterator[str]:
    kind = schema.get("type")
    if kind not in JSON_TYPES:
        yield f"{where}: type {kind!r}"
    if "enum" in schema and not (schema["enum"] and len(set(schema["enum"])) == len(schema["enum"])):  # fmt: skip
        yield f"{where}: enum {schema['enum']!r}"
    if "default" in schema and "enum" in schema and schema["default"] not in schema["enum"]:
        yield f"{where}: default outside the enum"
    if kind == "array":
        yield from _schema_problems(schema.get("items", {}), where + "[]")
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties or not set(schema.get("required", [])) <= set(properties):
            yield f"{where}: required {schema.get('required')!r} of {list(properties)}"
        for name, sub in properties.items():
            yield from _schema_problems(sub, f"{where}.{name}")


def test_the_offered_schemas_are_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    kinds: set[str] = set()
    for task in _tasks("test", "all") + _tasks("train", "all"):
        names = [function["name"] for function in task.functions]
        assert len(names) == len(set(names)) and 1 <= len(names) <= 5
        for function in task.functions:
            assert not list(_schema_problems(function["parameters"], function["name"]))
            jsonschema.Draft202012Validator.check_schema(function["parameters"])
            kinds |= {p["type"] for p in function["parameters"]["properties"].values()}
        for gold in task.gold:
            jsonschema.validate(gold.arguments, gold.parameters)

    assert kinds == JSON_TYPES


def test_catalog_names_are_unique() -> None:
    names = [name for blueprint in CATALOG for name in blueprint.names]

    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- the env


def test_registered_env_passes_check_env() -> None:
    check_env(make("palaestra/FunctionCall-v0"))
    check_env(make("palaestra/FunctionCall-v0", split="test", category="parallel"))


def test_reset_offers_the_tools_and_the_request() -> None:
    env = make("palaestra/FunctionCall-v0", split="test", tools_in_prompt=True, system_prompt="Hi.")

    messages, info = env.reset(options={"task_index": 3})

    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == env.task.request
    assert info["tools"] == env.task.tools and info["task_id"] == env.task.task_id
    assert all(tool["function"]["name"] in messages[0]["content"] for tool in info["tools"])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(EnvConfigError, match="unknown category"):
        FunctionCallEnv(category="paralel")
    with pytest.raises(TaskSourceError, match="larger than test_size"):
        FunctionCallEnv(split="test", size=300)
