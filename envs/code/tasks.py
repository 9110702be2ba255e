"""``CodeTask``: a programming task with hidden tests, and code extraction from replies.

A ``CodeTask`` is a ``Task`` (so code envs can use any task machinery, ``ToolEnv``'s
included) with the tests that judge a program. Two kinds of tests:

- function tests (``tests`` + ``entry_point``): Python snippets that call ``candidate``, the
  program's function named ``entry_point``, and fail by raising (``assert candidate(2) ==
  4``). ``setup`` is trusted code the snippets may use (helper functions, imports); it runs
  beside the tests, never in the program's process.
- io tests (``io_tests``): ``(stdin, expected stdout)`` pairs for a whole program.

``Task.answer`` holds a correct reply (the reference program in a fenced code block), so
``info["answer"]`` can be played back as a gold reply.

What this module does not do: run anything (see ``grading.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from palaestra.envs.errors import TaskSourceError
from palaestra.envs.tasks import Task

FENCED = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeTask(Task):
    """A programming task: the question, a gold reply, and the hidden tests."""

    tests: tuple[str, ...] = ()
    """Function tests: snippets that call ``candidate`` and raise on failure."""
    entry_point: str = ""
    """The name of the function function tests call as ``candidate``."""
    setup: str = ""
    """Trusted code run before each function test, in the tests' process."""
    io_tests: tuple[tuple[str, str], ...] = ()
    """Program tests: ``(stdin, expected stdout)`` pairs."""
    prefix: str = ""
    """Code put before the program extracted from a reply (e.g. the imports and helpers the
    question shows), so a reply need not repeat them."""

    def __post_init__(self) -> None:
        if bool(self.tests) == bool(self.io_tests):
            raise TaskSourceError(
                f"code task {self.task_id!r} needs function tests or io tests (exactly one kind)."
            )
        if self.tests and not self.entry_point.isidentifier():
            raise TaskSourceError(
                f"code task {self.task_id!r} has function tests but entry_point "
                f"{self.entry_point!r} is not a function name."
            )

    @property
    def num_tests(self) -> int:
        """How many tests judge a program."""
        return len(self.tests) or len(self.io_tests)


def extract_code(reply: str) -> str | None:
    """The program in a reply: the last fenced block tagged ``python`` (or ``py``), else the
    last untagged fenced block; None when the reply has no fenced block."""
    blocks = [(tag.lower(), body) for tag, body in FENCED.findall(reply)]
    for wanted in (("python", "py", "python3"), ("",)):
        bodies = [body for tag, body in blocks if tag in wanted]
        if bodies:
            return bodies[-1]
    return None


def program_for(task: CodeTask, code: str) -> str:
    """The program that is tested: the task's ``prefix`` followed by ``code``."""
    return f"{task.prefix}\n\n{code}" if task.prefix else code


def fenced(code: str) -> str:
    """``code`` as a fenced Python block: the form replies are expected in."""
    return f"```python\n{code.rstrip()}\n```"
