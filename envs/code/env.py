"""``CodeEnv`` and ``CodeToolEnv``: write a program, hidden tests in a sandbox decide the reward.

``CodeEnv`` is single-turn: ``reset`` shows the question, ``step`` takes the reply, extracts
the program (the last fenced Python block, after the task's ``prefix``), runs the task's
hidden tests against it in a sandbox (``grading.run_tests``) and ends the episode.
``CodeToolEnv`` is the multi-turn form, a ``ToolEnv``: the model may call ``run_python`` to
execute code and read its output before it replies without a tool call; that final reply is
graded the same way.

Reward (``reward=``): ``"all"`` gives 1 when every test passes, ``"fraction"`` the fraction
passed. A program caught attempting a reward hack (exiting early with success, skipping or
patching tests, an always-equal object, writing a fake result; see ``grading.py``) scores 0
whatever it passed. The final info carries ``tests_passed``, ``tests_total``, ``success``,
``timed_out``, ``no_code`` and ``reward_hack`` (the attempts' names), and
``reward_components = {"correct": reward, "reward_hack": 1.0 if any attempt else 0.0}``, so
attempts are counted in the trainer's per-step metrics.

Sandboxes: ``sandbox=`` takes a backend name (``"bubblewrap"`` by default, ``"docker"``,
or ``"local"`` with ``unsafe_local=True``) or any ``Sandbox``. Envs built with the same
backend name and ``pool_size`` share one process-wide ``SandboxPool`` (released when the last
of them closes), so a rollout with 64 envs still runs at most ``pool_size`` programs at once.

Infrastructure failures are not scored: when the sandbox cannot start, breaks, or times out
before the harness starts, ``step`` raises ``SandboxInfraError`` and the rollout ends the
episode as ``env_error``, counted and left out of the gradient. ``CodeToolEnv`` does the
same when a ``run_python`` call hits one.

What these envs do not do: give partial credit beyond the fraction of tests, judge style, or
let the program use packages beyond the sandbox's Python standard library.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

from palaestra.envs.code.grading import TestReport, run_tests
from palaestra.envs.code.tasks import CodeTask, extract_code, program_for
from palaestra.envs.core import Messages
from palaestra.envs.errors import EnvConfigError
from palaestra.envs.single_turn import SingleTurnEnv, question_messages
from palaestra.envs.step_info import StepInfo
from palaestra.envs.tasks import Split, Task, check_split
from palaestra.envs.tool_env import ToolEnv
from palaestra.envs.tools import Tool
from palaestra.sandboxes import (
    Limits,
    Sandbox,
    SandboxInfraError,
    SandboxPool,
    make_sandbox,
    run_python,
)

DEFAULT_SYSTEM_PROMPT = (
    "You are an expert Python programmer. Reply with the complete solution in one "
    "```python code block."
)
"""The default system message of ``CodeEnv``."""

TOOL_SYSTEM_PROMPT = (
    "You are an expert Python programmer. You may run Python code with the run_python tool "
    "to test your ideas. When you are done, reply without a tool call, with the complete "
    "solution in one ```python code block."
)
"""The default system message of ``CodeToolEnv``."""

DEFAULT_LIMITS = Limits(wall_time_s=30.0, cpu_time_s=20, memory_bytes=1024 << 20)
"""Limits of one grading run (all of a task's tests) or one ``run_python`` call."""

REWARDS = ("all", "fraction")
TOOL_OUTPUT_CHARS = 4000
"""Characters of a ``run_python`` call's stdout and stderr (each) the model is shown."""


class _Grader:
    """What both envs share: the sandbox, the limits, and scoring a reply."""

    def __init__(
        self,
        sandbox: str | Sandbox,
        pool_size: int | None,
        unsafe_local: bool,
        limits: Limits | None,
        test_timeout_s: float,
        reward: str,
    ) -> None:
        if reward not in REWARDS:
            raise EnvConfigError(f"reward must be one of {REWARDS}, got {reward!r}.")
        if test_timeout_s <= 0:
            raise EnvConfigError(f"test_timeout_s must be > 0, got {test_timeout_s}.")
        self.reward = reward
        self.limits = limits or DEFAULT_LIMITS
        self.test_timeout_s = test_timeout_s
        if isinstance(sandbox, str):
            size = pool_size or os.cpu_count() or 1
            self.shared_key: tuple[str, int, bool] | None = (sandbox, size, unsafe_local)
            self.sandbox: Sandbox = _SHARED.acquire(self.shared_key)
        else:
            self.shared_key = None
            self.sandbox = sandbox

    async def grade(self, task: CodeTask, reply: str) -> tuple[float, StepInfo]:
        """The reward of ``reply`` and the final step's info that explains it."""
        code = extract_code(reply)
        if code is None:
            report = TestReport(passed=(False,) * task.num_tests, errors=("no code",))
        else:
            report = await run_tests(
                self.sandbox, program_for(task, code), task, self.limits, self.test_timeout_s
            )
        score = report.fraction if self.reward == "fraction" else float(report.all_passed)
        reward = 0.0 if report.hacks else score
        info = StepInfo(
            task_id=task.task_id,
            success=report.all_passed and not report.hacks,
            reward_hack=tuple(report.hacks),
            reward_components={"correct": reward, "reward_hack": float(bool(report.hacks))},
            extra={
                "answer": task.answer,
                "tests_passed": report.num_passed,
                "tests_total": len(report.passed),
                "timed_out": report.timed_out,
                "no_code": code is None,
                "test_errors": [e for e in report.errors if e][:3],
            },
        )
        return reward, info

    def release(self) -> None:
        if self.shared_key is not None:
            _SHARED.release(self.shared_key)
            self.shared_key = None


class CodeEnv(SingleTurnEnv[CodeTask]):
    """Single-turn code tasks judged by hidden tests in a sandbox (see the module docstring)."""

    def __init__(
        self,
        tasks: Sequence[CodeTask],
        *,
        split: Split = "train",
        sandbox: str | Sandbox = "bubblewrap",
        pool_size: int | None = None,
        unsafe_local: bool = False,
        limits: Limits | None = None,
        test_timeout_s: float = 10.0,
        reward: str = "all",
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        """Args:
        tasks: the split's ``CodeTask``s.
        split: ``"train"`` or ``"test"``.
        sandbox: a backend name (``"bubblewrap"``, ``"docker"``, ``"local"``) for a shared
            pool, or a ``Sandbox`` (the env will not close it).
        pool_size: sandboxes in the shared pool (default: the number of CPU cores).
        unsafe_local: allow ``sandbox="local"`` (no isolation; trusted code only).
        limits: limits of one grading run (default ``DEFAULT_LIMITS``).
        test_timeout_s: wall-clock seconds per test.
        reward: ``"all"`` (1 if every test passes) or ``"fraction"``.
        system_prompt: the system message, or None for none.
        """
        if not tasks:
            raise EnvConfigError(f"{type(self).__name__} got no tasks for split {split!r}.")
        self.split = check_split(split)
        self.tasks = list(tasks)
        self.system_prompt = system_prompt
        self.grader = _Grader(sandbox, pool_size, unsafe_local, limits, test_timeout_s, reward)

    @property
    def num_tasks(self) -> int:
        """How many tasks the split holds."""
        return len(self.tasks)

    def task_at(self, index: int) -> CodeTask:
        return self.tasks[index]

    def opening(self, task: CodeTask) -> tuple[Messages, dict[str, Any]]:
        """The system prompt and the question; the task's id, answer and split."""
        info = StepInfo(task_id=task.task_id, extra={"answer": task.answer, "split": self.split})
        return question_messages(self.system_prompt, task.question), info.to_info()

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Grade the reply ``action`` and end the episode (runs its own event loop)."""
        return asyncio.run(self.astep(action))

    async def astep(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Grade the reply ``action`` in the sandbox and end the episode."""
        reward, info = await self.grader.grade(self.take_task(), action)
        return [], reward, True, False, info.to_info()

    def close(self) -> None:
        """Give back the shared sandbox pool. Idempotent."""
        self.grader.release()


class CodeToolEnv(ToolEnv):
    """Multi-turn code tasks with a ``run_python`` tool (see the module docstring)."""

    def __init__(
        self,
        tasks: Sequence[CodeTask],
        *,
        split: Split = "train",
        sandbox: str | Sandbox = "bubblewrap",
        pool_size: int | None = None,
        unsafe_local: bool = False,
        limits: Limits | None = None,
        test_timeout_s: float = 10.0,
        reward: str = "all",
        system_prompt: str | None = TOOL_SYSTEM_PROMPT,
        **options: Any,
    ) -> None:
        """Args: as ``CodeEnv``; ``limits`` also bound each ``run_python`` call.
        **options: ``ToolEnv`` options (``tool_format``, ``max_turns``, ``max_tool_calls``,
            ``tools_in_prompt``).
        """
        self.grader = _Grader(sandbox, pool_size, unsafe_local, limits, test_timeout_s, reward)
        run = Tool.from_function(self.run_python, timeout=self.grader.limits.wall_time_s + 60)
        super().__init__(tasks, [run], split=split, system_prompt=system_prompt, **options)
        self._graded: tuple[float, StepInfo] | None = None
        self._infra_error: SandboxInfraError | None = None

    async def run_python(self, code: str) -> str:
        """Run Python code in a fresh sandbox and return its exit code, stdout and stderr.

        Args:
            code: A complete Python program (standard library only); print what you want to see.
        """
        try:
            result = await run_python(self.grader.sandbox, code, limits=self.grader.limits)
        except SandboxInfraError as error:
            self._infra_error = error  # raised from step: not the model's doing
            raise
        status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
        if result.truncated:
            status += " (output truncated)"
        return (
            f"{status}\nstdout:\n{result.stdout[-TOOL_OUTPUT_CHARS:]}\n"
            f"stderr:\n{result.stderr[-TOOL_OUTPUT_CHARS:]}"
        )

    def verify(self, task: Task, answer: str) -> float:
        """The reward of the final reply (graded in ``astep``, or here from ``step``)."""
        if self._graded is None:
            self._graded = asyncio.run(self.grader.grade(_code_task(task), answer))
        return self._graded[0]

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Play one message: run its ``run_python`` calls, or grade it as the final reply."""
        return self._finish(super().step(action))

    async def astep(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Async ``step``: grading awaits the sandbox instead of blocking the event loop."""
        if self.task is not None and self.format.parse(action).is_final:
            self._graded = await self.grader.grade(_code_task(self.task), action)
        return self._finish(await super().astep(action))

    def close(self) -> None:
        """Give back the shared sandbox pool. Idempotent."""
        self.grader.release()

    def _finish(
        self, outcome: tuple[Messages, float, bool, bool, dict[str, Any]]
    ) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        error, self._infra_error = self._infra_error, None
        graded, self._graded = self._graded, None
        if error is not None:
            raise error
        observation, reward, terminated, truncated, info = outcome
        if graded is not None and terminated:
            info |= graded[1].to_info()
        return observation, reward, terminated, truncated, info


def _code_task(task: Task) -> CodeTask:
    if not isinstance(task, CodeTask):
        raise EnvConfigError(f"CodeToolEnv needs CodeTask tasks, got {type(task).__name__}.")
    return task


class _SharedPools:
    """One ``SandboxPool`` per (backend, size, unsafe_local), shared by the envs using it and
    closed with the last of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, int, bool], SandboxPool] = {}
        self._users: dict[tuple[str, int, bool], int] = {}

    def acquire(self, key: tuple[str, int, bool]) -> SandboxPool:
        backend, size, unsafe_local = key
        with self._lock:
            if key not in self._pools:
                self._pools[key] = SandboxPool(
                    lambda: make_sandbox(backend, unsafe_local=unsafe_local), size
                )
                self._users[key] = 0
            self._users[key] += 1
            return self._pools[key]

    def release(self, key: tuple[str, int, bool]) -> None:
        with self._lock:
            self._users[key] -= 1
            if self._users[key] == 0:
                self._pools.pop(key).close()
                del self._users[key]


_SHARED = _SharedPools()
