"""HumanEval through CodeEnv on bubblewrap: every canonical solution passes, and every one
broken (last line removed, or a wrong return value) fails."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from palaestra.envs import make
from palaestra.envs.code import CodeTask, extract_code, fenced
from palaestra.envs.errors import EnvConfigError
from palaestra.envs.humaneval import HumanEvalEnv, humaneval_tasks
from palaestra.sandboxes import SandboxPool
from tests.sandboxes.conftest import bubblewrap_or_skip, docker_engine

__all__ = ["docker_engine"]  # the fixture, for the docker run of the canonical solutions

WRONG_RETURN = """

_original = {name}


def {name}(*args):
    value = _original(*args)
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, (str, list, tuple)):
        return value + value[:1] if value else value + type(value)("?" if isinstance(value, str) else [0])
    return None
"""


def without_last_line(task: CodeTask) -> str:
    code = extract_code(task.answer) or ""
    lines = code.rstrip().splitlines()
    return fenced("\n".join(lines[:-1]))


def with_wrong_return(task: CodeTask) -> str:
    code = extract_code(task.answer) or ""
    return fenced(code + WRONG_RETURN.format(name=task.entry_point))


@pytest.fixture(scope="module")
def env():
    inner = bubblewrap_or_skip()
    pool = SandboxPool(lambda: inner, size=4)
    yield HumanEvalEnv(sandbox=pool)
    pool.close()


async def grade_all(env: HumanEvalEnv, replies: list[str]) -> list[float]:
    tasks = humaneval_tasks()
    graded = await asyncio.gather(
        *(env.grader.grade(task, reply) for task, reply in zip(tasks, replies, strict=True))
    )
    return [reward for reward, _ in graded]


def test_the_164_problems_load() -> None:
    tasks = humaneval_tasks()

    assert len(tasks) == 164 and len({t.task_id for t in tasks}) == 164
    assert tasks[0].task_id == "HumanEval/0" and tasks[0].entry_point == "has_close_elements"
    assert "def has_close_elements" in tasks[0].question


async def test_every_canonical_solution_passes(env: HumanEvalEnv) -> None:
    rewards = await grade_all(env, [task.answer for task in humaneval_tasks()])

    failing = [t.task_id for t, r in zip(humaneval_tasks(), rewards, strict=True) if r != 1.0]
    assert failing == []


@pytest.mark.slow
@pytest.mark.docker
async def test_every_canonical_solution_passes_on_docker(docker_engine) -> None:
    docker_env = HumanEvalEnv(sandbox="docker", pool_size=2)
    try:
        rewards = await grade_all(docker_env, [task.answer for task in humaneval_tasks()])
    finally:
        docker_env.close()

    assert rewards == [1.0] * 164


@pytest.mark.slow
@pytest.mark.parametrize("mutate", [without_last_line, with_wrong_return])
async def test_every_broken_solution_fails(env: HumanEvalEnv, mutate) -> None:
    rewards = await grade_all(env, [mutate(task) for task in humaneval_tasks()])

    passing = [t.task_id for t, r in zip(humaneval_tasks(), rewards, strict=True) if r != 0.0]
    assert passing == []


def test_a_step_through_the_registered_env() -> None:
    bubblewrap_or_skip()
    env = make("palaestra/HumanEval-v0", pool_size=1)
    _, info = env.reset(options={"task_index": 2})

    _, reward, terminated, _, step_info = env.step(info["answer"])

    assert reward == 1.0 and terminated and step_info["task_id"] == "HumanEval/2"
    env.close()


def test_training_on_humaneval_is_refused() -> None:
    with pytest.raises(EnvConfigError, match="evaluation set"):
        HumanEvalEnv(split="train")


def test_palaestra_eval_reports_pass_at_k_on_humaneval() -> None:
    bubblewrap_or_skip()
    args = "--model tiny-random --env palaestra/HumanEval-v0 --num-tasks 2 --samples 3 "
    args += "--temperature 1.0 --max-tokens 8 --sandbox bubblewrap --json"
    out = subprocess.run(
        [sys.executable, "-m", "palaestra", "eval", *args.split()],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)["palaestra/HumanEval-v0"]
    assert result["num_tasks"] == 2 and set(result["pass_at"]) == {"1", "3"}
    assert result["infra_failures"] == 0 and result["accuracy"] == 0.0  # random weights
