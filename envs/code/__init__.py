"""Code environments: programs judged by hidden tests run in a sandbox.

- ``tasks``: ``CodeTask`` (a ``Task`` with function or io tests) and code extraction.
- ``grading``: ``run_tests`` runs the tests through ``harness.py`` in a sandbox and returns a
  ``TestReport`` (passes, errors, reward-hack attempts).
- ``env``: ``CodeEnv`` (single turn) and ``CodeToolEnv`` (multi-turn, with ``run_python``).
- ``harness.py``: the script that runs inside the sandbox; never imported.

This package imports no torch; it executes code only through ``palaestra.sandboxes``.
"""

from palaestra.envs.code.env import CodeEnv, CodeToolEnv
from palaestra.envs.code.grading import TestReport, run_tests
from palaestra.envs.code.tasks import CodeTask, extract_code, fenced, program_for

__all__ = [
    "CodeEnv",
    "CodeTask",
    "CodeToolEnv",
    "TestReport",
    "extract_code",
    "fenced",
    "program_for",
    "run_tests",
]
