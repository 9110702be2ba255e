"""Run a program's hidden tests in a sandbox and read back an honest verdict.

``run_tests`` ships ``harness.py`` and the program into a fresh sandbox, sends the tests to
the harness on stdin (they never touch the sandbox's disk) and parses the one verdict line
that carries the run's random nonce. It returns a ``TestReport``:

- every test's pass/fail and error text, and whether the run hit its wall-clock limit;
- ``hacks``: the reward-hack attempts the harness saw (``exit``, ``skip``, ``eq_override``,
  ``patched_builtins``, ``channel``, ``tampered``; see ``harness.py``), plus ``forged_output`` when the
  sandbox's stdout holds anything but the harness's two lines.

A program that crashes, loops, floods or fails is a report with failed tests. A sandbox that
fails is an exception: ``SandboxInfraError`` from the backend, or ``SandboxStartError`` when
the harness never started (its ``started`` line is missing, e.g. the sandbox's set-up ran
past the wall-clock limit), so the episode is dropped as an infrastructure failure instead
of being scored 0.

What this module does not do: extract code from model replies, or turn a report into a
reward (``CodeEnv`` does both).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from palaestra.envs.code.tasks import CodeTask
from palaestra.sandboxes import Limits, Sandbox, SandboxStartError

HARNESS_SOURCE = (Path(__file__).parent / "harness.py").read_text()
"""The harness script, shipped into every grading sandbox as ``harness.py``."""
SOLUTION_FILE = "solution.py"


@dataclass(frozen=True)
class TestReport:
    """The outcome of one program against its task's hidden tests."""

    passed: tuple[bool, ...]
    """Pass/fail of each test, in the task's order."""
    errors: tuple[str, ...]
    """Why each failed test failed (empty for passed tests)."""
    hacks: tuple[str, ...] = ()
    """Reward-hack attempts seen (sorted names; see the module docstring)."""
    timed_out: bool = False
    """The whole run hit its wall-clock limit (tests not reached count as failed)."""

    @property
    def num_passed(self) -> int:
        """How many tests passed."""
        return sum(self.passed)

    @property
    def all_passed(self) -> bool:
        """Every test passed (and there was at least one)."""
        return bool(self.passed) and all(self.passed)

    @property
    def fraction(self) -> float:
        """The fraction of tests passed."""
        return self.num_passed / len(self.passed) if self.passed else 0.0


async def run_tests(
    sandbox: Sandbox, program: str, task: CodeTask, limits: Limits, test_timeout_s: float
) -> TestReport:
    """Run ``program`` against ``task``'s tests in ``sandbox``; see the module docstring."""
    nonce = secrets.token_hex(16)
    spec = {
        "nonce": nonce,
        "kind": "function" if task.tests else "io",
        "tests": list(task.tests),
        "io_tests": [list(pair) for pair in task.io_tests],
        "entry_point": task.entry_point,
        "setup": task.setup,
        "solution": SOLUTION_FILE,
        "test_timeout": test_timeout_s,
    }
    result = await sandbox.run(
        [sandbox.python, "-I", "harness.py"],
        files={"harness.py": HARNESS_SOURCE, SOLUTION_FILE: program},
        stdin=json.dumps(spec),
        limits=limits,
    )
    lines = result.stdout.splitlines()
    started = f"{nonce} started" in lines
    if not started:
        why = "timed out before it started" if result.timed_out else "did not start"
        raise SandboxStartError(
            f"the test harness {why} (exit status {result.exit_code}): {result.stderr[-500:]}"
        )
    verdicts = [line[len(nonce) + 1 :] for line in lines if line.startswith(f"{nonce} {{")]
    forged = len(lines) != 1 + len(verdicts) or len(verdicts) > 1
    if not verdicts:  # killed at the wall-clock limit, or the harness was starved
        failed = (False,) * task.num_tests
        reason = "the tests timed out" if result.timed_out else "the test run was killed"
        return TestReport(
            passed=failed,
            errors=(reason,) * task.num_tests,
            hacks=("forged_output",) if forged else (),
            timed_out=result.timed_out,
        )
    verdict = json.loads(verdicts[-1])
    hacks = set(verdict["signals"]) | ({"forged_output"} if forged else set())
    return TestReport(
        passed=tuple(bool(p) for p in verdict["passed"]),
        errors=tuple(str(e) for e in verdict["errors"]),
        hacks=tuple(sorted(hacks)),
        timed_out=result.timed_out,
    )
