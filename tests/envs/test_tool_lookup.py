"""ToolLookupEnv: a scripted solve with lookup + calculator, the expert solver, disjoint splits,
a safe calculator."""

from __future__ import annotations

import re

import pytest

from palaestra.envs import (
    HermesFormat,
    LookupTasks,
    ResetNeededError,
    TaskSourceError,
    ToolCall,
    ToolLookupEnv,
    calculator,
    make,
    solver_of,
)

HERMES = HermesFormat()


@pytest.mark.parametrize("task_index", range(6))  # covers the three kinds of question
def test_scripted_solve_with_lookup_and_calculator(task_index: int) -> None:
    env = make("palaestra/ToolLookup-v0", split="test")
    messages, info = env.reset(options={"task_index": task_index})
    catalog = env.task.metadata["catalog"]
    question = messages[-1]["content"]
    field = next(f for f in ("price", "stock", "weight") if f in question)
    items = sorted((name for name in catalog if name in question), key=question.index)

    lookups = [
        ToolCall("lookup", {"item": f"the {name.lower()}", "field": field}) for name in items
    ]
    observation, reward, terminated, _, step_info = env.step(HERMES.render(lookups, "Looking up."))
    values = [int(m["content"]) for m in observation]
    assert values == [catalog[name][field] for name in items]
    assert (reward, terminated, step_info["tool_calls"]) == (0.0, False, len(items))

    expression = _expression(question, values)
    observation, *_ = env.step(HERMES.render([ToolCall("calculator", {"expression": expression})]))
    result = observation[0]["content"]
    assert result == info["answer"]

    _, reward, terminated, _, step_info = env.step(f"The answer is \\boxed{{{result}}}.")
    assert (reward, terminated, step_info["success"]) == (1.0, True, True)
    env.close()


def _expression(question: str, values: list[int]) -> str:
    """The arithmetic the question asks for, on the looked-up values."""
    factor = re.search(r"multiplied by (\d+)", question)
    if factor:
        return f"{values[0]} * {factor.group(1)}"
    return f"{values[0]} {'+' if ' plus ' in question else '-'} {values[1]}"


def test_unknown_item_lists_the_catalog() -> None:
    env = ToolLookupEnv(split="test")
    env.reset(seed=1)

    observation, *_ = env.step(HERMES.render([ToolCall("lookup", {"item": "x", "field": "price"})]))

    content = observation[0]["content"]
    assert content.startswith("Error: tool 'lookup' raised KeyError: \"no item named 'x'")
    assert all(name in content for name in env.task.metadata["catalog"])


def test_wrong_and_unboxed_answers() -> None:
    env = ToolLookupEnv(split="test")
    _, info = env.reset(seed=2)
    assert env.step(f"I think it is {info['answer']}")[1] == 1.0  # last number counts
    env.reset(seed=2)
    assert env.step(f"\\boxed{{{int(info['answer']) + 1}}}")[1] == 0.0
    env.reset(seed=2)
    assert env.step("\\boxed{many}")[1] == 0.0


def test_splits_never_share_a_question_and_are_deterministic() -> None:
    test = LookupTasks("test", test_size=200)
    train = LookupTasks("train", size=3000, test_size=200)

    test_questions = {test[i].question for i in range(len(test))}
    train_questions = [train[i].question for i in range(len(train))]

    assert len(test_questions) == 200 and not test_questions & set(train_questions)
    assert LookupTasks("train", size=5)[4] == train[4]
    assert LookupTasks("train", size=5, seed=1)[4] != train[4]


def test_catalog_values_differ_between_tasks() -> None:
    tasks = LookupTasks("test", test_size=20)

    catalogs = [tuple(tasks[i].metadata["catalog"]) for i in range(20)]

    assert len(set(catalogs)) == 20


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(TaskSourceError, match="at most test_size=10"):
        LookupTasks("test", size=11, test_size=10)
    with pytest.raises(TaskSourceError, match="num_items must be >= 2"):
        LookupTasks(num_items=1)


@pytest.mark.parametrize(
    ("expression", "value"),
    [("(12 + 30) * 3", 126), ("7 / 2", 3.5), ("8 / 2", 4), ("-3 ** 2", -9), ("17 // 5 % 2", 1)],
)
def test_calculator(expression: str, value: float) -> None:
    assert calculator(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "only numbers"),
        ("2 ** 1000000", "exceed 1e100"),
        ("((9 ** 50) ** 50) ** 50", "exceed 1e100"),
        ("1 +", "not an arithmetic expression"),
        ("'a' * 3", "only numbers"),
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calculator(expression)


def play_expert(env) -> dict:
    """Play the open episode with the env's expert through the real ``step``; the last info."""
    while True:
        _, _, terminated, truncated, info = env.step(solver_of(env).expert_action())
        if terminated or truncated:
            return info


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_expert_solves_every_task_in_three_turns(split: str) -> None:
    env = make("palaestra/ToolLookup-v0", split=split)
    infos = []
    for task_index in range(100):
        env.reset(options={"task_index": task_index})
        infos.append(play_expert(env))

    assert all(info["success"] for info in infos)
    assert {(info["turn"], info["tool_errors"]) for info in infos} == {(3, 0)}
    assert {info["tool_calls"] for info in infos} == {2, 3}  # 1 or 2 lookups + calculator


def test_the_expert_writes_the_envs_tool_format_and_skips_the_calculator_on_two_turns() -> None:
    env = make("palaestra/ToolLookup-v0", split="test", tool_format="json", max_turns=2)
    env.reset(options={"task_index": 0})
    first = env.expert_action()
    assert first.startswith("{") or first.startswith("[")
    env.step(first)
    assert env.expert_action().startswith("The answer is \\boxed{")
    env.step(env.expert_action())
    with pytest.raises(ResetNeededError, match="open episode"):  # the answer ended it
        env.expert_action()
    env.reset(options={"task_index": 1})
    assert play_expert(env)["success"]
