"""ToolEnv: scripted multi-turn episodes, error observations, limits, async tools."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from palaestra.envs import (
    EnvConfigError,
    HermesFormat,
    JsonFormat,
    ResetNeededError,
    Task,
    Tool,
    ToolCall,
    ToolEnv,
    ToolInfraError,
    check_env,
)

HERMES = HermesFormat()
RELEASE = threading.Event()  # never set while a test waits on it: the hanging tool's gate


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: First term.
        b: Second term.
    """
    return a + b


def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(reason)


def hang() -> str:
    """Blocks until released (past its time limit)."""
    RELEASE.wait(5)
    return "late"


def backend() -> str:
    """A tool whose service is down."""
    raise ToolInfraError("the lookup service is unreachable")


async def rendezvous(who: str) -> str:
    """Returns once a second call has arrived too (only when calls run concurrently)."""
    arrived.append(who)
    while len(arrived) < 2:
        await asyncio.sleep(0)
    return f"met {who}"


arrived: list[str] = []


class SumEnv(ToolEnv):
    """'What is a + b?' with an add tool; the answer must be exact."""

    def __init__(self, split: str = "train", **options) -> None:
        tasks = [Task(f"sum/{i}", f"What is {i} + {i + 1}?", str(2 * i + 1)) for i in range(10)]
        tools = [
            add,
            explode,
            Tool.from_function(hang, timeout=0.05),
            Tool.from_function(rendezvous, timeout=1),
            backend,
        ]
        super().__init__(tasks, tools, split=split, **options)

    def verify(self, task: Task, answer: str) -> float:
        return float(answer.strip() == task.answer)


def call(name: str, **arguments) -> str:
    return HERMES.render([ToolCall(name, arguments)])


def test_scripted_episode_call_then_answer() -> None:
    env = SumEnv()
    messages, info = env.reset(options={"task_index": 3})

    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "What is 3 + 4?" and info["task_id"] == "sum/3"
    assert [spec["function"]["name"] for spec in info["tools"]] == [
        "add",
        "explode",
        "hang",
        "rendezvous",
        "backend",
    ]
    assert info["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]
    assert info["tool_instructions"] == HERMES.instructions(info["tools"])

    observation, reward, terminated, truncated, info = env.step(call("add", a=3, b=4))
    assert observation == [{"role": "tool", "content": "7", "name": "add"}]
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert (info["turn"], info["tool_calls"], info["tool_errors"]) == (1, 1, 0)

    observation, reward, terminated, truncated, info = env.step("7")
    assert (observation, reward, terminated, truncated) == ([], 1.0, True, False)
    assert info["reward_components"] == {"correct": 1.0} and info["success"]
    assert env.stats.calls == [ToolCall("add", {"a": 3, "b": 4})]
    with pytest.raises(ResetNeededError):
        env.step("7")


def test_policy_failures_become_observations_and_counters() -> None:
    env = SumEnv()
    env.reset(seed=0)
    action = "\n".join(
        [
            call("subtract", a=1, b=2),
            call("add", a="1"),
            call("explode", reason="boom"),
            "<tool_call>{not json}</tool_call>",
        ]
    )

    observation, reward, terminated, truncated, info = env.step(action)

    assert [m["content"] for m in observation] == [
        "Error: there is no tool 'subtract' (tools: add, explode, hang, rendezvous, backend)",
        "Error: tool 'add' got invalid arguments: missing required argument 'b'; "
        "argument 'a' must be integer, got \"1\".",
        "Error: tool 'explode' raised RuntimeError: boom",
        "Error: tool call 4 is not valid JSON (Expecting property name enclosed in double "
        "quotes at line 1 column 2)",
    ]
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert (info["tool_calls"], info["tool_errors"], info["parse_errors"]) == (3, 3, 1)
    assert (info["unknown_tools"], info["bad_arguments"], info["tool_exceptions"]) == (1, 1, 1)
    assert info["stop_reason"] == "parse_error"  # if the episode ended here


def test_a_tool_exception_alone_is_no_parse_error() -> None:
    env = SumEnv()
    env.reset(seed=0)

    *_, info = env.step(call("explode", reason="bad input"))

    assert info["tool_exceptions"] == 1 and "stop_reason" not in info


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        (call("hang"), "tool 'hang' did not finish within 0.05 s."),
        (call("backend"), "the lookup service is unreachable"),
    ],
)
async def test_an_infrastructure_failure_of_a_tool_ends_the_episode(broken, error) -> None:
    env = SumEnv()
    env.reset(seed=0)
    stepped = env.step(call("add", a=1, b=2) + broken)
    env.reset(seed=0)
    awaited = await env.astep(call("add", a=1, b=2) + broken)

    for observation, reward, terminated, truncated, info in (stepped, awaited):
        assert (observation, reward, terminated, truncated) == ([], 0.0, False, True)
        assert info["stop_reason"] == "tool_error" and info["error"] == error
        assert not info["success"]
    with pytest.raises(ResetNeededError):
        env.step("3")


def test_a_call_on_the_last_turn_truncates_without_running() -> None:
    env = SumEnv(max_turns=2)
    env.reset(seed=0)
    env.step(call("add", a=1, b=1))

    observation, reward, terminated, truncated, info = env.step(call("explode", reason="x"))

    assert (observation, reward, terminated, truncated) == ([], 0.0, False, True)
    assert info["max_turns_reached"] and not info["success"]
    assert info["reward_components"] == {"correct": 0.0} and info["tool_calls"] == 1
    assert "stop_reason" not in info  # a well-formed call: the episode ends on max_turns


@pytest.mark.parametrize("last", [call("add", a=1), call("nope"), "<tool_call>{oops</tool_call>"])
def test_a_malformed_call_on_the_last_turn_is_a_parse_error(last: str) -> None:
    env = SumEnv(max_turns=1)
    env.reset(seed=0)

    *_, truncated, info = env.step(last)

    assert truncated and info["stop_reason"] == "parse_error"


def test_calls_past_the_budget_are_refused() -> None:
    env = SumEnv(max_tool_calls=1)
    env.reset(seed=0)

    observation, *_, info = env.step(call("add", a=1, b=1) + call("add", a=2, b=2))

    assert [m["content"] for m in observation] == [
        "2",
        "Error: the budget of 1 tool calls per episode is used up; answer without tools",
    ]
    assert (info["tool_calls"], info["tool_errors"]) == (2, 1)


def test_json_format_with_user_results_and_tools_in_the_prompt() -> None:
    env = SumEnv(tool_format=JsonFormat(result_role="user"), tools_in_prompt=True)
    messages, info = env.reset(seed=0)

    observation, *_ = env.step('{"name": "add", "arguments": {"a": 2, "b": 5}}')

    assert '"name": "add"' in messages[0]["content"] and "JSON object" in messages[0]["content"]
    assert info["tool_instructions"] in messages[0]["content"]
    assert observation == [{"role": "user", "content": '[{"name": "add", "result": "7"}]'}]


async def test_astep_awaits_async_tools_concurrently() -> None:
    arrived.clear()
    env = SumEnv()
    await env.areset(seed=0)

    observation, *_, info = await env.astep(
        call("rendezvous", who="a") + call("add", a=1, b=2) + call("rendezvous", who="b")
    )

    assert [m["content"] for m in observation] == ["met a", "3", "met b"]
    assert info["tool_errors"] == 0
    _, reward, terminated, _, _ = await env.astep("nothing")
    assert (reward, terminated) == (0.0, True)


async def test_astep_reports_errors_like_step() -> None:
    env = SumEnv()
    await env.areset(seed=0)

    observation, *_, info = await env.astep(call("add", a=1) + call("explode", reason="boom"))

    assert [m["content"] for m in observation] == [
        "Error: tool 'add' got invalid arguments: missing required argument 'b'.",
        "Error: tool 'explode' raised RuntimeError: boom",
    ]
    assert (info["bad_arguments"], info["tool_exceptions"]) == (1, 1)


def test_reset_picks_tasks_by_index_or_seed() -> None:
    env = SumEnv()

    assert env.reset(seed=4)[0] == env.reset(seed=4)[0]
    with pytest.raises(EnvConfigError, match=r"task_index'\] must be an integer in \[0, 10\)"):
        env.reset(options={"task_index": 10})


def test_configuration_errors() -> None:
    with pytest.raises(EnvConfigError, match="tool names must be unique"):
        ToolEnv([Task("t", "q", "a")], [add, add])
    with pytest.raises(EnvConfigError, match="max_turns must be >= 1"):
        SumEnv(max_turns=0)
    with pytest.raises(EnvConfigError, match="got no tasks"):
        ToolEnv([], [add])


def test_a_tool_env_passes_check_env() -> None:
    check_env(SumEnv())


def test_the_custom_tool_env_example_runs() -> None:
    script = Path(__file__).parents[2] / "examples" / "custom_tool_env.py"

    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert "check_env: passed" in done.stdout and "reward=1.0 success=True" in done.stdout
