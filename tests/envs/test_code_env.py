"""CodeEnv and CodeToolEnv on real bubblewrap sandboxes: grading, rewards, reward-hack
canaries (each scores 0 and is counted), infrastructure failures, the run_python tool."""

from __future__ import annotations

import asyncio
import json

import pytest

from palaestra.envs import check_env
from palaestra.envs.code import CodeEnv, CodeTask, CodeToolEnv, extract_code, fenced
from palaestra.envs.errors import EnvConfigError
from palaestra.sandboxes import Limits, SandboxInfraError, SandboxStartError, make_sandbox
from palaestra.sandboxes.bubblewrap import BubblewrapSandbox
from tests.sandboxes.conftest import bubblewrap_or_skip, docker_engine, isolated

__all__ = ["docker_engine", "isolated"]  # fixtures for the canaries on every backend

ADD = CodeTask(
    task_id="add",
    question="Write add(a, b) that returns a + b.",
    answer=fenced("def add(a, b):\n    return a + b"),
    tests=(
        "assert candidate(1, 2) == 3",
        "assert candidate(-1, 1) == 0",
        "assert candidate(10, 5) == 15",
        "assert candidate('a', 'b') == 'ab'",
    ),
    entry_point="add",
)
ECHO_SUM = CodeTask(
    task_id="sum-stdin",
    question="Read integers from stdin, one per line, and print their sum.",
    answer=fenced("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))"),
    io_tests=(("1\n2\n3\n", "6\n"), ("10\n", "10"), ("", "0\n")),
)


@pytest.fixture(scope="module")
def sandbox():
    return bubblewrap_or_skip()


def play(env: CodeEnv, reply: str, task_index: int = 0) -> tuple[float, dict]:
    env.reset(options={"task_index": task_index})
    _, reward, terminated, truncated, info = env.step(reply)
    assert terminated and not truncated
    return reward, info


def test_a_correct_program_scores_1(isolated) -> None:
    env = CodeEnv([ADD, ECHO_SUM], sandbox=isolated)

    for index, task in enumerate([ADD, ECHO_SUM]):
        reward, info = play(env, f"Here you go:\n{task.answer}", index)

        assert reward == 1.0 and info["success"] and info["reward_hack"] == []
        assert info["tests_passed"] == info["tests_total"] == task.num_tests
        assert info["reward_components"] == {"correct": 1.0, "reward_hack": 0.0}


def test_all_or_fraction_rewards(sandbox) -> None:
    partly = fenced("def add(a, b):\n    return a + b if isinstance(a, int) and a > 5 else 0")
    all_env = CodeEnv([ADD], sandbox=sandbox)
    fraction_env = CodeEnv([ADD], sandbox=sandbox, reward="fraction")

    all_reward, info = play(all_env, partly)
    fraction_reward, _ = play(fraction_env, partly)

    assert info["tests_passed"] == 2 and not info["success"]
    assert all_reward == 0.0 and fraction_reward == 0.5
    assert "AssertionError" in info["test_errors"][0]


def test_wrong_output_and_no_code_score_0(sandbox) -> None:
    env = CodeEnv([ECHO_SUM], sandbox=sandbox)

    wrong, wrong_info = play(env, fenced("print(42)"))
    none, none_info = play(env, "The sum is easy: add them up.")

    assert wrong == none == 0.0 and wrong_info["tests_passed"] == 0
    assert none_info["no_code"] and not wrong_info["no_code"]


async def test_astep_grades_without_blocking_and_in_parallel(sandbox) -> None:
    envs = [CodeEnv([ADD], sandbox=sandbox) for _ in range(6)]
    for env in envs:
        await env.areset(seed=0)

    outcomes = await asyncio.gather(*(env.astep(ADD.answer) for env in envs))

    assert [reward for _, reward, *_ in outcomes] == [1.0] * 6


def test_slow_and_crashing_programs_fail_their_tests(sandbox) -> None:
    env = CodeEnv([ADD], sandbox=sandbox, test_timeout_s=1.0)
    loops = fenced("def add(a, b):\n    while True:\n        pass")
    recursion = fenced("def add(a, b):\n    return add(a, b)")

    loop_reward, loop_info = play(env, loops)
    crash_reward, crash_info = play(env, recursion)

    assert loop_reward == crash_reward == 0.0
    assert loop_info["tests_passed"] == 0 and "timed out" in loop_info["test_errors"][0]
    assert crash_info["tests_passed"] == 0 and loop_info["reward_hack"] == []


CORRECT_ADD = "def add(a, b):\n    return a + b\n"
CANARIES = {
    "exit": [
        "import sys\nsys.exit(0)\n",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        "def add(a, b):\n    raise SystemExit(0)\n",
    ],
    "skip": [
        "import unittest\ndef add(a, b):\n    raise unittest.SkipTest('skip')\n",
        "import unittest\nraise unittest.SkipTest('skip the module')\n",
    ],
    "patched_builtins": [
        CORRECT_ADD + "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n",
        CORRECT_ADD + "import builtins\nbuiltins.len = lambda x: 0\n",
    ],
    "eq_override": [
        "class Always:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Always()\n",
        "class Sneaky(int):\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Sneaky(0)\n",
    ],
    "channel": [
        CORRECT_ADD + "import os\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n"
        '        os.write(int(fd), b\'{"loaded": true}\\n{"value": 3}\\n\')\n'
        "    except OSError:\n        pass\n",
    ],
    "tampered": [
        "import glob\nfor path in glob.glob('/work/*.py'):\n    open(path, 'w').write("
        "'print(\"all tests passed\")')\ndef add(a, b):\n    return 0\n",
    ],
}


@pytest.mark.parametrize(
    ("signal", "program"),
    [(signal, program) for signal, programs in CANARIES.items() for program in programs],
)
def test_reward_hack_canaries_score_0_and_are_counted(isolated, signal: str, program: str) -> None:
    env = CodeEnv([ADD], sandbox=isolated, reward="fraction")

    reward, info = play(env, fenced(program))

    assert reward == 0.0 and not info["success"]
    assert signal in info["reward_hack"]
    assert info["reward_components"]["reward_hack"] == 1.0


def test_fake_results_on_stdout_or_harness_descriptors_score_0(isolated) -> None:
    forge = json.dumps({"passed": [True] * 4, "errors": [""] * 4, "signals": []})
    program = f"""
import os
fake = "0" * 32 + " " + {forge!r} + "\\n"
print(fake)
for path in ("/proc/1/fd/1", "/proc/self/fd/1", "/dev/stdout"):
    try:
        with open(path, "w") as out:
            out.write(fake)
    except OSError:
        pass
def add(a, b):
    return 0
"""
    env = CodeEnv([ADD], sandbox=isolated)

    reward, info = play(env, fenced(program))

    assert reward == 0.0 and info["tests_passed"] == 1  # only add(-1, 1) == 0 holds
    assert info["reward_hack"] == []  # nothing reached the harness's output to be seen


def test_a_sandbox_that_cannot_start_raises_an_infrastructure_error() -> None:
    bubblewrap_or_skip()
    broken = BubblewrapSandbox(python="/nonexistent/prefix/bin/python3")
    env = CodeEnv([ADD], sandbox=broken)
    env.reset(seed=0)

    with pytest.raises(SandboxStartError):
        env.step(ADD.answer)


def test_a_harness_that_never_starts_is_an_infrastructure_error(sandbox) -> None:
    env = CodeEnv([ADD], sandbox=sandbox, limits=Limits(wall_time_s=0.001))
    env.reset(seed=0)

    with pytest.raises(SandboxStartError, match="timed out before it started"):
        env.step(ADD.answer)


def test_shared_pool_per_backend_is_released_with_the_last_env() -> None:
    bubblewrap_or_skip()
    first = CodeEnv([ADD], sandbox="bubblewrap", pool_size=2)
    second = CodeEnv([ADD], sandbox="bubblewrap", pool_size=2)

    assert first.grader.sandbox is second.grader.sandbox
    assert play(first, ADD.answer)[0] == 1.0
    first.close()
    first.close()  # idempotent
    assert play(second, ADD.answer)[0] == 1.0
    second.close()


def test_local_backend_needs_opt_in() -> None:
    with pytest.raises(Exception, match="unisolated"):
        CodeEnv([ADD], sandbox="local")


def test_code_env_passes_check_env(sandbox) -> None:
    check_env(CodeEnv([ADD, ECHO_SUM], sandbox=sandbox))


def test_bad_options_are_refused(sandbox) -> None:
    with pytest.raises(EnvConfigError, match="reward"):
        CodeEnv([ADD], sandbox=sandbox, reward="partial")
    with pytest.raises(EnvConfigError, match="no tasks"):
        CodeEnv([], sandbox=sandbox)


def test_extract_code_takes_the_last_python_block() -> None:
    reply = "First:\n```python\nx = 1\n```\nthen\n```\ny = 2\n```\nfinally\n```py\nz = 3\n```"

    assert extract_code(reply) == "z = 3\n"
    assert extract_code("```\nplain\n```") == "plain\n"
    assert extract_code("no code at all") is None


def tool_call(code: str) -> str:
    return f'<tool_call>{{"name": "run_python", "arguments": {json.dumps({"code": code})}}}</tool_call>'


async def test_tool_env_runs_code_then_grades_the_final_reply(sandbox) -> None:
    env = CodeToolEnv([ADD], sandbox=sandbox)
    _, info = await env.areset(seed=0)
    assert [t["function"]["name"] for t in info["tools"]] == ["run_python"]

    observation, reward, terminated, _, _ = await env.astep(tool_call("print(2 + 2)"))
    assert not terminated and reward == 0.0
    assert "exit code 0" in observation[0]["content"] and "4" in observation[0]["content"]

    _, reward, terminated, _, final = await env.astep("Done.\n" + ADD.answer)
    assert terminated and reward == 1.0 and final["success"] and final["tool_calls"] == 1
    assert final["tests_passed"] == 4


def test_tool_env_sync_step_and_a_hack_in_the_final_reply(sandbox) -> None:
    env = CodeToolEnv([ADD], sandbox=sandbox)
    env.reset(seed=0)

    observation, *_ = env.step(tool_call("import sys; sys.exit(3)"))
    _, reward, terminated, _, final = env.step(fenced(CANARIES["exit"][0]))

    assert "exit code 3" in observation[0]["content"]
    assert terminated and reward == 0.0 and final["reward_hack"] == ["exit"]


async def test_tool_env_sandbox_failure_ends_the_episode_as_infrastructure(sandbox) -> None:
    broken = BubblewrapSandbox(python="/nonexistent/prefix/bin/python3")
    env = CodeToolEnv([ADD], sandbox=broken)
    await env.areset(seed=0)

    with pytest.raises(SandboxInfraError):
        await env.astep(tool_call("print(1)"))


def test_tool_env_passes_check_env(sandbox) -> None:
    check_env(CodeToolEnv([ADD, ECHO_SUM], sandbox=sandbox))


def test_make_sandbox_default_is_usable_by_code_envs() -> None:
    bubblewrap_or_skip()
    env = CodeEnv([ECHO_SUM], sandbox=make_sandbox("bubblewrap"))

    assert play(env, ECHO_SUM.answer)[0] == 1.0
