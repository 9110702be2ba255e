"""``FunctionCallEnv``: procedural function-calling tasks with exact gold calls.

Each task is drawn from a seed: a small random API (one to five functions picked from a
catalog of 17 across six domains: weather, bookings, unit conversion, messaging,
inventory, travel), each with its own randomly chosen name and parameter names, and
parameters typed string, integer, number, boolean, enum, array or nested object, some of
them optional; then a user request phrased from templates that states every value the
gold calls need (city names, dates, quantities, enum choices, quoted texts). Categories:

- ``simple``: one function offered, one call;
- ``multiple``: two to five offered, exactly one fits, one call;
- ``parallel``: one function offered, two or three calls to it with different values;
- ``parallel_multiple``: two or three calls to different functions (plus distractors);
- ``irrelevance``: no offered function fits (the request comes from another domain):
  the right reply calls nothing and says so.

``step`` reads the calls with the configured ``ToolCallFormat`` and ``call_mismatch``
scores them: reward 1 when the calls match the gold calls in any order (same function,
every argument the request sets present with its value: numbers compared as numbers,
strings without regard to case or spacing, enums and booleans exactly, arrays in the
order the request lists them, nested objects key by key), no argument the function does
not define, no optional argument the request did not ask for (unless it equals the
schema's ``default``); an irrelevance task scores 1 when no call is made. A reply with an
unreadable call scores 0. ``info["reward_components"]`` holds ``correct`` and ``format``
(``format_reward``, 0 by default, for a reply with no unreadable call that calls something
where a call is due); ``info["mismatch"]`` says why a reply failed.

Splits: test task ``i`` of a category is drawn from its own seed (``category="all"``
takes, at index ``i``, test task ``i`` of the category it draws for ``i``); train task
``i`` is redrawn while its request text is among the first ``test_size`` test tasks of any
category, so no train split shares a request with any test split of the same ``seed`` and
``test_size``. ``expert_action`` (the scripted solver) writes the gold calls, or for an
irrelevance task a sentence saying that no function fits. The functions come from
``function_catalog``.

What this env does not do: multi-turn dialogue, running the functions, or partial credit.
It shares nothing with BFCL (``palaestra/BFCL-v0``): no data, no scorer; BFCL stays a
held-out benchmark.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from palaestra.envs.core import Message, Messages
from palaestra.envs.errors import EnvConfigError, ResetNeededError, TaskSourceError
from palaestra.envs.function_catalog import CATALOG, DrawnFunction, draw_call, draw_function
from palaestra.envs.single_turn import SingleTurnEnv
from palaestra.envs.step_info import StepInfo
from palaestra.envs.tasks import Split, check_index, check_split, resolve_size, stable_hash
from palaestra.envs.tool_calls import ToolCall, ToolCallFormat, get_format
from palaestra.envs.tool_env import function_task_opening

CATEGORY_WEIGHTS: dict[str, float] = {
    "simple": 0.2,
    "multiple": 0.25,
    "parallel": 0.2,
    "parallel_multiple": 0.2,
    "irrelevance": 0.15,
}
"""The categories, and how often ``category="all"`` draws each."""


@dataclass(frozen=True)
class GoldCall:
    """One expected call."""

    name: str
    """The function's name."""
    arguments: dict[str, Any]
    """Every argument the request states, with its value."""
    parameters: dict[str, Any]
    """The function's JSON schema (required arguments, enums, defaults, nested objects)."""


@dataclass(frozen=True)
class FunctionCallTask:
    """One request, the functions on offer and the gold calls."""

    task_id: str
    """Stable id, e.g. ``"function_call/seed0/test/all/3"``."""
    category: str
    """A key of ``CATEGORY_WEIGHTS``."""
    request: str
    """The user's request (the whole user message)."""
    functions: tuple[dict[str, Any], ...]
    """The functions on offer: ``{"name", "description", "parameters"}`` (JSON schema)."""
    gold: tuple[GoldCall, ...]
    """The expected calls, any order; empty for ``irrelevance``."""

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The functions as OpenAI function-tool specs."""
        return [{"type": "function", "function": function} for function in self.functions]

    @property
    def gold_calls(self) -> list[ToolCall]:
        """The gold calls as ``ToolCall``s (what the scripted solver writes)."""
        return [ToolCall(gold.name, dict(gold.arguments)) for gold in self.gold]


# ------------------------------------------------------------------------------- scoring


def call_mismatch(calls: Sequence[ToolCall], gold: Sequence[GoldCall]) -> str | None:
    """Why ``calls`` are not the ``gold`` calls (one short sentence), or None when they are.

    The rules are the module docstring's; ``gold`` empty means that no call is right.
    """
    if not gold:
        names = ", ".join(call.name for call in calls)
        return (
            f"no offered function fits this request, but the reply called {names}"
            if calls
            else None
        )
    if len(calls) != len(gold):
        return f"expected {len(gold)} call(s), got {len(calls)}"
    reasons = [[_call_mismatch(call, expected) for call in calls] for expected in gold]
    for order in itertools.permutations(range(len(calls))):  # a task has at most 3 calls
        if all(reasons[row][column] is None for row, column in enumerate(order)):
            return None
    for expected, row in zip(gold, reasons, strict=True):
        if all(reason is not None for reason in row):
            same_name = [
                r for call, r in zip(calls, row, strict=True) if call.name == expected.name
            ]
            return (same_name or row)[0]
    return "the calls fit the expected calls only if one call is counted twice"


def _call_mismatch(call: ToolCall, gold: GoldCall) -> str | None:
    if call.name != gold.name:
        return f"called {call.name!r}, expected {gold.name!r}"
    reason = _object_mismatch(call.arguments, gold.arguments, gold.parameters, "")
    return None if reason is None else f"{gold.name}: {reason}"


def _object_mismatch(
    value: dict[str, Any], gold: dict[str, Any], schema: dict[str, Any], path: str
) -> str | None:
    """Why the object ``value`` is not ``gold`` under its JSON ``schema``, or None."""
    properties = schema.get("properties", {})
    for key in value:
        if key not in properties:
            return f"unknown argument {path + key!r}"
    for key in schema.get("required", []):
        if key not in value:
            return f"missing required argument {path + key!r}"
    for key, expected in gold.items():
        if key not in value:
            return f"argument {path + key!r} is missing; the request sets it to {expected!r}"
        reason = _value_mismatch(value[key], expected, properties[key], path + key)
        if reason is not None:
            return reason
    for key in value.keys() - gold.keys():
        known = properties[key]
        if "default" not in known or _value_mismatch(value[key], known["default"], known, ""):
            return f"argument {path + key!r}={value[key]!r} was not asked for"
    return None


def _value_mismatch(value: Any, gold: Any, schema: dict[str, Any], path: str) -> str | None:
    if isinstance(gold, dict):
        if isinstance(value, dict):
            return _object_mismatch(value, gold, schema, path + ".")
    elif isinstance(gold, list):
        if isinstance(value, list) and len(value) == len(gold):
            items = [
                _value_mismatch(v, g, schema["items"], path)
                for v, g in zip(value, gold, strict=True)
            ]
            if all(item is None for item in items):
                return None
    elif "enum" in schema:  # exact: an enum is a closed set of spellings
        if isinstance(value, str) and value == gold:
            return None
    elif _same(value, gold):
        return None
    return f"argument {path!r}={value!r} should be {gold!r}"


def _same(value: Any, gold: Any) -> bool:
    """Scalars: booleans exactly, numbers as numbers, strings up to case and spacing."""
    if isinstance(gold, bool) or isinstance(value, bool):
        return value is gold
    if isinstance(gold, (int, float)):
        return isinstance(value, (int, float)) and math.isclose(value, gold, rel_tol=1e-9)
    if isinstance(gold, str) and isinstance(value, str):
        return " ".join(value.split()).casefold() == " ".join(gold.split()).casefold()
    return bool(value == gold)


# --------------------------------------------------------------------------------- tasks

_OPENERS = ("Please {}.", "Could you {}?", "I need you to {}.", "Can you {}?", "{}.")
_MAX_REDRAWS = 32
_DISTRACTORS = {"multiple": (1, 5), "parallel_multiple": (0, 3)}
"""How many functions no call needs a task offers, [low, high), where it offers any."""


def draw_task(rng: np.random.Generator, category: str, task_id: str) -> FunctionCallTask:
    """One ``category`` task: a request, the functions on offer and the gold calls."""
    order = [CATALOG[i] for i in rng.permutation(len(CATALOG))]
    if category == "irrelevance":
        asked, others = order[0], [b for b in order if b.domain != order[0].domain]
        clause, _ = draw_call(rng, draw_function(rng, asked))
        offered = [draw_function(rng, b) for b in others[: int(rng.integers(1, 5))]]
        request = _sentence(rng, [clause])
        return FunctionCallTask(task_id, category, request, tuple(f.spec for f in offered), ())
    calls = 1 if category in ("simple", "multiple") else int(rng.integers(2, 4))
    called = calls if category == "parallel_multiple" else 1  # functions called
    distractors = int(rng.integers(*_DISTRACTORS.get(category, (0, 1))))
    functions = [draw_function(rng, b) for b in order[: called + distractors]]
    targets = functions[:1] * calls if category == "parallel" else functions[:called]
    clauses, gold = _draw_calls(rng, targets)
    specs = tuple(functions[i].spec for i in rng.permutation(len(functions)))
    return FunctionCallTask(task_id, category, _sentence(rng, clauses), specs, gold)


def _draw_calls(
    rng: np.random.Generator, targets: list[DrawnFunction]
) -> tuple[list[str], tuple[GoldCall, ...]]:
    """One clause and one gold call per target, no two calls alike."""
    clauses, gold, seen = [], [], set()
    for function in targets:
        for _ in range(_MAX_REDRAWS):
            clause, arguments = draw_call(rng, function)
            key = json.dumps([function.name, arguments], sort_keys=True)
            if key not in seen:
                break
        seen.add(key)
        clauses.append(clause)
        gold.append(GoldCall(function.name, arguments, function.spec["parameters"]))
    return clauses, tuple(gold)


def _sentence(rng: np.random.Generator, clauses: list[str]) -> str:
    body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + ", and " + clauses[-1]
    text = _OPENERS[int(rng.integers(len(_OPENERS)))].format(body)
    return text[0].upper() + text[1:]


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(stable_hash("function_call:" + ":".join(map(str, key))))


def _mixed_category(rng: np.random.Generator) -> str:
    weights = np.array(list(CATEGORY_WEIGHTS.values()))
    return str(rng.choice(list(CATEGORY_WEIGHTS), p=weights / weights.sum()))


def _test_task(seed: int, category: str, index: int) -> FunctionCallTask:
    """Test task ``index`` of ``category``; ``"all"`` takes task ``index`` of the category
    it draws for the index, so every test split is drawn from the same five streams."""
    if category == "all":
        category = _mixed_category(_rng(seed, "test", "mix", index))
    task_id = f"function_call/seed{seed}/test/{category}/{index}"
    return draw_task(_rng(seed, "test", category, index), category, task_id)


@functools.cache
def _test_requests(seed: int, test_size: int) -> frozenset[str]:
    """Every request a test split of this seed and ``test_size`` may hold, any category."""
    return frozenset(
        _test_task(seed, category, index).request
        for category in CATEGORY_WEIGHTS
        for index in range(test_size)
    )


class FunctionCallTasks:
    """The tasks of one split, generated on demand (see the module docstring)."""

    def __init__(
        self,
        split: Split = "train",
        size: int | None = None,
        seed: int = 0,
        category: str = "all",
        test_size: int = 200,
    ) -> None:
        """Args:
        split: ``"train"`` or ``"test"``.
        size: tasks in the split; 10,000 for train and ``test_size`` for test by default.
        seed: the seed both splits derive from.
        category: a key of ``CATEGORY_WEIGHTS``, or ``"all"`` for their weighted mix.
        test_size: size of the test split, whose requests train tasks avoid.
        """
        self.split = check_split(split)
        if category != "all" and category not in CATEGORY_WEIGHTS:
            raise EnvConfigError(
                f"unknown category {category!r}; use 'all' or one of {list(CATEGORY_WEIGHTS)}."
            )
        self.size = resolve_size(size, self.split, test_size)
        self.seed, self.category, self.test_size = seed, category, test_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> FunctionCallTask:
        check_index(index, self.size, self)
        if self.split == "test":
            return _test_task(self.seed, self.category, index)
        task_id = f"function_call/seed{self.seed}/train/{self.category}/{index}"
        for redraw in range(_MAX_REDRAWS):
            rng = _rng(self.seed, "train", self.category, index, redraw)
            category = _mixed_category(rng) if self.category == "all" else self.category
            task = draw_task(rng, category, task_id)
            if task.request not in _test_requests(self.seed, self.test_size):
                return task
        raise TaskSourceError(f"{self}: train task {index} kept matching test requests.")

    def __repr__(self) -> str:
        return (
            f"FunctionCallTasks(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"category={self.category!r})"
        )


# ----------------------------------------------------------------------------------- env


class FunctionCallEnv(SingleTurnEnv[FunctionCallTask]):
    """Call the right functions with the right arguments, or none (module docstring)."""

    def __init__(
        self,
        split: Split = "train",
        seed: int = 0,
        size: int | None = None,
        test_size: int = 200,
        category: str = "all",
        tool_format: str | ToolCallFormat = "hermes",
        system_prompt: str | None = None,
        tools_in_prompt: bool = False,
        format_reward: float = 0.0,
    ) -> None:
        """Args:
        split, seed, size, test_size, category: see ``FunctionCallTasks``.
        tool_format: how the model writes calls: ``"hermes"``, ``"json"`` or a format.
        system_prompt: a system message put before the request, or None.
        tools_in_prompt: describe the functions and the call syntax in the system message,
            for chat templates that ignore ``tools=``.
        format_reward: added for a reply with no unreadable call that calls a function
            where a call is due (any readable reply on an irrelevance task).
        """
        self.tasks = FunctionCallTasks(split, size, seed, category, test_size)
        self.split = self.tasks.split
        self.format = get_format(tool_format)
        self.system_prompt = system_prompt
        self.tools_in_prompt = tools_in_prompt
        self.format_reward = format_reward

    @property
    def num_tasks(self) -> int:
        """How many tasks the split holds."""
        return len(self.tasks)

    def task_at(self, index: int) -> FunctionCallTask:
        return self.tasks[index]

    def opening(self, task: FunctionCallTask) -> tuple[Messages, dict[str, Any]]:
        """The system message (if any) and the request; the functions in ``info["tools"]``."""
        return function_task_opening(
            self.system_prompt,
            self.format,
            task.tools,
            [Message(role="user", content=task.request)],
            tools_in_prompt=self.tools_in_prompt,
            info=StepInfo(task_id=task.task_id, category=task.category, extra=self._extra(task)),
        )

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Score the reply's calls against the gold calls and end the episode."""
        task = self.take_task()
        parsed = self.format.parse(action)
        if parsed.errors:
            reason: str | None = f"unreadable call: {parsed.errors[0]}"
        else:
            reason = call_mismatch(parsed.calls, task.gold)
        well_formed = not parsed.errors and (bool(parsed.calls) or not task.gold)
        components = {
            "correct": 1.0 if reason is None else 0.0,
            "format": self.format_reward if well_formed else 0.0,
        }
        offered = {function["name"] for function in task.functions}
        info = StepInfo(
            task_id=task.task_id,
            category=task.category,
            success=reason is None,
            tool_calls=len(parsed.calls),
            parse_errors=len(parsed.errors),
            unknown_tools=sum(call.name not in offered for call in parsed.calls),
            reward_components=components,
            extra={**self._extra(task), "mismatch": reason},
        )
        return [], sum(components.values()), True, False, info.to_info()

    def expert_action(self) -> str:
        """The gold calls in the env's format, or, where no function fits, a sentence saying so."""
        if self.task is None:
            raise ResetNeededError("expert_action() needs an open episode: call reset() first.")
        if self.task.gold:
            return self.format.render(self.task.gold_calls)
        names = ", ".join(function["name"] for function in self.task.functions)
        return f"None of the available functions ({names}) can do that."

    def _extra(self, task: FunctionCallTask) -> dict[str, Any]:
        answer = [{"name": call.name, "arguments": call.arguments} for call in task.gold_calls]
        return {"split": self.split, "answer": answer}
