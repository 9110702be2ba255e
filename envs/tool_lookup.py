"""``ToolLookupEnv``: questions about a small random catalog that only tools can answer.

Every task comes with its own catalog of a few fictional items (``"Vorbelin kettle"``), each
with a price, a stock count and a weight, drawn at random from the task's seed. A question
combines one or two catalog values with arithmetic ("What is the price of the Vorbelin
kettle multiplied by 7?"), so the model must call ``lookup`` (and may call ``calculator``)
to answer: the values exist nowhere but in the episode, so they cannot be memorised. The
final answer is a number (boxed, or the last number in the reply) scored by exact value.

Splits: the test split is the first ``test_size`` tasks drawn from a test seed; train task
``i`` is drawn from its own seed and redrawn while its question text appears in the test
split, so the splits never share a question (and catalogs differ anyway).

Scripted solver (``expert_action``, see ``envs/solver.py``): each task records how it is
solved (``Task.metadata["recipe"]``: the field, the items and the arithmetic), so the expert
plays three turns in the env's own tool-call format: the ``lookup`` calls, then one
``calculator`` call on the looked-up values, then ``\\boxed{}`` around the calculator's
result (two turns, without the calculator, when ``max_turns`` is 2). Every number the
expert writes was read from a tool result, so a model trained on its episodes learns to
copy numbers rather than do arithmetic.

What this env does not do: partial credit, or checking that the tools were actually used
(a lucky guess scores; with values up to hundreds it rarely happens).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from palaestra.envs.errors import ResetNeededError, TaskSourceError
from palaestra.envs.tasks import Split, Task, check_split, stable_hash
from palaestra.envs.tool_calls import ToolCall
from palaestra.envs.tool_env import ToolEnv
from palaestra.envs.tools import Tool
from palaestra.envs.verify import AnswerFallback, extract_answer

Field = Literal["price", "stock", "weight"]
FIELDS: tuple[Field, ...] = ("price", "stock", "weight")
_FIELD_RANGES = {"price": (2, 100), "stock": (0, 500), "weight": (50, 2000)}
_FIELD_WORDS = {"price": "price in coins", "stock": "number in stock", "weight": "weight in grams"}

_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_NOUNS = ("kettle", "lamp", "rope", "lantern", "saddle", "kite", "drum", "bell", "compass", "ladle")


class LookupTasks:
    """The tasks of one split; a ``TaskSource`` (catalog in ``Task.metadata["catalog"]``)."""

    MAX_REDRAWS = 16
    """Seeds a train index tries before giving up on a question outside the test split."""

    def __init__(
        self,
        split: Split = "train",
        size: int | None = None,
        seed: int = 0,
        num_items: int = 6,
        test_size: int = 200,
    ) -> None:
        """Args:
        split: ``"train"`` or ``"test"``.
        size: tasks in the split; 10,000 for train and ``test_size`` for test by default.
        seed: the seed both splits derive from.
        num_items: items per catalog (at least 2).
        test_size: size of the test split that train questions avoid.
        """
        self.split = check_split(split)
        if num_items < 2 or test_size < 1:
            raise TaskSourceError(
                f"num_items must be >= 2 and test_size >= 1, got {num_items} and {test_size}."
            )
        self.size = (10_000 if self.split == "train" else test_size) if size is None else size
        if self.size < 1 or (self.split == "test" and self.size > test_size):
            raise TaskSourceError(
                f"size must be at least 1 (and at most test_size={test_size} for the test "
                f"split), got {size}."
            )
        self.seed = seed
        self.num_items = num_items
        self._test = [self._draw("test", i, 0) for i in range(test_size)]
        self._test_questions = frozenset(task.question for task in self._test)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Task:
        if not 0 <= index < self.size:
            raise IndexError(f"task index {index} is out of range for {self} ({self.size} tasks).")
        if self.split == "test":
            return self._test[index]
        for redraw in range(self.MAX_REDRAWS):
            task = self._draw("train", index, redraw)
            if task.question not in self._test_questions:
                return task
        raise TaskSourceError(f"{self}: train task {index} kept matching test questions.")

    def __repr__(self) -> str:
        return f"LookupTasks(split={self.split!r}, size={self.size}, seed={self.seed})"

    def _draw(self, split: Split, index: int, redraw: int) -> Task:
        rng = np.random.default_rng(
            stable_hash(f"tool_lookup:{self.seed}:{split}:{index}:{redraw}")
        )
        catalog = _random_catalog(rng, self.num_items)
        question, answer, recipe = _random_question(rng, catalog)
        return Task(
            task_id=f"tool_lookup/seed{self.seed}/{split}/{index}",
            question=question,
            answer=str(answer),
            metadata={"catalog": catalog, "recipe": recipe},
        )


def _random_catalog(rng: np.random.Generator, num_items: int) -> dict[str, dict[str, int]]:
    catalog: dict[str, dict[str, int]] = {}
    while len(catalog) < num_items:
        syllables = [str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(3)]
        name = "".join(syllables).capitalize() + " " + str(rng.choice(_NOUNS))
        catalog[name] = {f: int(rng.integers(*_FIELD_RANGES[f])) for f in FIELDS}
    return catalog


def _random_question(
    rng: np.random.Generator, catalog: dict[str, dict[str, int]]
) -> tuple[str, int, dict[str, Any]]:
    """A question, its answer and its recipe: ``{"field", "items", "expression"}``, where
    ``expression.format(*values)`` (the items' looked-up values) is the answer's arithmetic."""
    field: Field = FIELDS[int(rng.integers(len(FIELDS)))]
    first, second = (str(name) for name in rng.choice(list(catalog), size=2, replace=False))
    a, b = catalog[first][field], catalog[second][field]
    what = _FIELD_WORDS[field]
    kind = int(rng.integers(3))
    if kind == 0:
        factor = int(rng.integers(2, 10))
        recipe = {"field": field, "items": [first], "expression": f"{{0}} * {factor}"}
        return f"What is the {what} of the {first}, multiplied by {factor}?", a * factor, recipe
    sign, word, answer = ("+", "plus", a + b) if kind == 1 else ("-", "minus", a - b)
    recipe = {"field": field, "items": [first, second], "expression": f"{{0}} {sign} {{1}}"}
    question = f"What is the {what} of the {first} {word} the {what} of the {second}?"
    return question, answer, recipe


# ----------------------------------------------------------------------------- calculator

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression, e.g. "(12 + 30) * 3".

    Args:
        expression: Numbers with + - * / // % ** and parentheses.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression") from None
    value = _evaluate(tree.body)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _evaluate(node: ast.expr) -> int | float:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _evaluate(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and right * math.log10(abs(left)) > 100:
            raise ValueError("the result would exceed 1e100")
        result: int | float = _BINARY[type(node.op)](left, right)
        return result
    raise ValueError(
        f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}"
    )


# ------------------------------------------------------------------------------------ env


class ToolLookupEnv(ToolEnv):
    """Answer arithmetic questions about a per-task random catalog with ``lookup`` + ``calculator``."""

    def __init__(
        self,
        split: Split = "train",
        seed: int = 0,
        size: int | None = None,
        test_size: int = 200,
        num_items: int = 6,
        **options: Any,
    ) -> None:
        """Args:
        split, seed, size, test_size, num_items: see ``LookupTasks``.
        **options: ``ToolEnv`` options (``tool_format``, ``max_turns``, ``max_tool_calls``,
            ``system_prompt``, ``tools_in_prompt``).
        """
        tasks = LookupTasks(split, size=size, seed=seed, num_items=num_items, test_size=test_size)
        tools = [
            Tool.from_function(self.lookup, timeout=2.0),
            Tool.from_function(calculator, timeout=2.0),
        ]
        super().__init__(tasks, tools, split=split, **options)

    def lookup(self, item: str, field: Field) -> int:
        """Look up one value of an item in the catalog.

        Args:
            item: The item's name, e.g. "Vorbelin kettle".
            field: Which value: "price" (coins), "stock" (units) or "weight" (grams).
        """
        catalog: dict[str, dict[str, int]] = self.task.metadata["catalog"] if self.task else {}
        wanted = item.strip().lower().removeprefix("the ").strip()
        for name, values in catalog.items():
            if name.lower() == wanted:
                return values[field]
        raise KeyError(f"no item named {item!r}; the items are: {', '.join(catalog)}")

    def expert_action(self) -> str:
        """The expert's next message (``ScriptedSolver``): the ``lookup`` calls, then a
        ``calculator`` call on their values (skipped when ``max_turns`` is 2), then the boxed
        result. It reads the values with the env's own tools, as the episode's results show
        them."""
        if self.task is None:
            raise ResetNeededError("ToolLookupEnv.expert_action() needs an open episode: reset().")
        recipe = self.task.metadata["recipe"]
        field, items = recipe["field"], recipe["items"]
        expression = recipe["expression"].format(*(self.lookup(item, field) for item in items))
        calculate = self.max_turns >= 3
        if self.stats.turn == 0:
            calls = [ToolCall("lookup", {"item": item, "field": field}) for item in items]
        elif self.stats.turn == 1 and calculate:
            calls = [ToolCall("calculator", {"expression": expression})]
        else:
            return f"The answer is \\boxed{{{calculator(expression)}}}."
        return self.format.render(calls)

    def verify(self, task: Task, answer: str) -> float:
        """1 when the boxed (else last) number in the answer equals the gold value."""
        extracted = extract_answer(answer, AnswerFallback.LAST_NUMBER)
        try:
            return float(extracted is not None and float(extracted) == float(task.answer))
        except ValueError:  # a boxed non-number
            return 0.0
