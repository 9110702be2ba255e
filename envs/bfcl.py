"""``BFCLEnv``: the Berkeley Function Calling Leaderboard's single-turn categories.

The questions, function documents and possible answers are the BFCL v4 files shipped in
the ``bfcl-eval`` wheel (``bfcl_eval/data``), read as JSON lines; the package itself is
never imported (its dependencies are not needed). Install it without them::

    pip install --no-deps bfcl-eval

One episode is one BFCL question. ``reset`` returns the question's messages and the
functions as OpenAI function-tool specs in ``info["tools"]`` (BFCL's own types ``dict``,
``float``, ``tuple``, ``any`` mapped to JSON schema, as BFCL does for function-calling
models). ``step`` reads the model's calls with the configured ``ToolCallFormat`` and scores
them against the possible answers, following BFCL's AST checker:

- the number of calls equals the number of expected calls, each call matches one expected
  call (any order for the parallel categories): same function name, every required
  parameter present, no parameter the function or the answer does not name;
- each value is among the allowed values: strings compared case-insensitively with spaces
  and ``,./-_*^`` ignored, lists and dicts element by element (same rule for their
  strings), an int accepted where a float is expected; a parameter whose allowed values
  include ``""`` may be left out;
- ``irrelevance`` and ``live_irrelevance``: no function fits the question, so success
  means making no call (an unreadable call attempt counts as none, as in BFCL).

Reward 1 for a match, else 0 with the reason in ``info["mismatch"]``; ``info["category"]``
names the question's category. ``CATEGORIES`` maps palaestra's names to v4 file names
(``simple`` is BFCL's ``simple_python``); the default is the five expert-written ones
(``DEFAULT_CATEGORIES``: simple, multiple, parallel, parallel_multiple, irrelevance), and
the user-contributed ``live_*`` versions of each can be selected too.

Splits: BFCL is an evaluation set, so every question is in ``split="test"`` and
``split="train"`` is refused; training on it would make its score meaningless. Train on
``palaestra/ToolLookup-v0`` or your own ``ToolEnv`` and evaluate here.

What this env does not do: BFCL's multi-turn, live_relevance, Java/JavaScript, memory,
web-search or format-sensitivity categories, executing the functions, or BFCL's
prompt-mode system prompts. For chat templates that ignore ``tools=``, the renderer adds
``info["tool_instructions"]`` (the format's description of the functions and the call
syntax) to the system message.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palaestra.envs.core import Message, Messages
from palaestra.envs.errors import EnvConfigError, TaskSourceError
from palaestra.envs.jsonl import read_jsonl
from palaestra.envs.single_turn import SingleTurnEnv
from palaestra.envs.step_info import StepInfo
from palaestra.envs.tool_calls import ToolCall, ToolCallFormat, get_format
from palaestra.envs.tool_env import function_task_opening

CATEGORIES: dict[str, str] = {
    "simple": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "irrelevance": "irrelevance",
    "live_simple": "live_simple",
    "live_multiple": "live_multiple",
    "live_parallel": "live_parallel",
    "live_parallel_multiple": "live_parallel_multiple",
    "live_irrelevance": "live_irrelevance",
}
"""palaestra category name -> BFCL v4 file stem (``BFCL_v4_<stem>.json``)."""

DEFAULT_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
"""BFCL's expert-written single-turn Python categories (its "non-live" AST group)."""

IRRELEVANCE = frozenset({"irrelevance", "live_irrelevance"})
"""Categories where no function fits: success means making no call."""

INSTALL_HINT = "pip install --no-deps bfcl-eval"

Answer = dict[str, dict[str, list[Any]]]
"""One expected call: ``{function name: {parameter: [allowed values]}}``."""


@dataclass(frozen=True)
class BFCLItem:
    """One BFCL question with its functions and possible answers."""

    item_id: str
    """BFCL's id, e.g. ``"simple_python_0"``."""
    category: str
    """The palaestra category name (a key of ``CATEGORIES``)."""
    messages: tuple[Message, ...]
    """The question's chat messages (BFCL's first and only turn)."""
    functions: tuple[dict[str, Any], ...]
    """The functions on offer, as BFCL documents them (BFCL types)."""
    answers: tuple[Answer, ...]
    """The expected calls; empty for ``irrelevance``."""

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The functions as OpenAI function-tool specs with JSON-schema types."""
        return [openai_tool(function) for function in self.functions]


# ----------------------------------------------------------------------------------- data


def data_dir() -> Path:
    """The ``data`` folder of the installed ``bfcl_eval`` package (found, not imported)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskSourceError(
            f"the BFCL data comes from the bfcl-eval package, which is not installed. Install "
            f"it with: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.cache
def load_category(category: str) -> tuple[BFCLItem, ...]:
    """Every question of one category (a key of ``CATEGORIES``), in BFCL's order."""
    if category not in CATEGORIES:
        raise EnvConfigError(
            f"unknown BFCL category {category!r}; known categories: {sorted(CATEGORIES)}."
        )
    stem = CATEGORIES[category]
    questions = _read_data(data_dir() / f"BFCL_v4_{stem}.json")
    answers: dict[str, list[Answer]] = {}
    if category not in IRRELEVANCE:
        answers = {
            row["id"]: row["ground_truth"]
            for row in _read_data(data_dir() / "possible_answer" / f"BFCL_v4_{stem}.json")
        }
    return tuple(
        BFCLItem(
            item_id=row["id"],
            category=category,
            messages=tuple(
                Message(role=m["role"], content=m["content"]) for m in row["question"][0]
            ),
            functions=tuple(row["function"]),
            answers=tuple(answers.get(row["id"], ())),
        )
        for row in questions
    )


def _read_data(path: Path) -> list[dict[str, Any]]:
    """The objects of one of BFCL's JSON-lines files (named ``.json``)."""
    if not path.is_file():
        raise TaskSourceError(
            f"{path} is missing; the installed bfcl-eval has no such file. Reinstall it with: "
            f"{INSTALL_HINT}"
        )
    return [row for _, row in read_jsonl(path)]


# ------------------------------------------------------------------------ function schemas

_JSON_SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def openai_tool(function: Mapping[str, Any]) -> dict[str, Any]:
    """A BFCL function document as an OpenAI function-tool spec (JSON-schema types)."""
    return {
        "type": "function",
        "function": {
            "name": function["name"],
            "description": function.get("description", ""),
            "parameters": _json_schema(function["parameters"]),
        },
    }


def _json_schema(schema: Any) -> Any:
    if not isinstance(schema, Mapping):
        return schema
    converted = dict(schema)
    if isinstance(converted.get("type"), str):
        converted["type"] = _JSON_SCHEMA_TYPES.get(converted["type"], converted["type"])
    if isinstance(converted.get("properties"), Mapping):
        converted["properties"] = {k: _json_schema(v) for k, v in converted["properties"].items()}
    if "items" in converted:
        converted["items"] = _json_schema(converted["items"])
    return converted


# -------------------------------------------------------------------------------- scoring

_PYTHON_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "number": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
_IGNORED_IN_STRINGS = re.compile(r"[ ,./\-_*^]")


def mismatch(calls: Sequence[ToolCall], item: BFCLItem) -> str | None:
    """Why ``calls`` do not answer ``item`` (one sentence), or None when they do."""
    if item.category in IRRELEVANCE:
        names = ", ".join(call.name for call in calls)
        return f"no function fits this question, but the model called {names}" if calls else None
    if len(calls) != len(item.answers):
        return f"expected {len(item.answers)} call(s), got {len(calls)}"
    docs = {function["name"]: function for function in item.functions}
    reasons = [[call_mismatch(call, answer, docs) for call in calls] for answer in item.answers]
    if _perfect_matching([[r is None for r in row] for row in reasons]):
        return None
    for index, row in enumerate(reasons):
        if all(r is not None for r in row):
            return (
                row[0]
                if len(calls) == 1
                else f"no call matches expected call {index + 1} ({row[0]})"
            )
    return "the calls fit the expected calls only if one call is used twice"


def _perfect_matching(fits: list[list[bool]]) -> bool:
    """Whether each expected call (row) can take its own fitting call (column)."""
    owner: dict[int, int] = {}

    def assign(row: int, seen: set[int]) -> bool:
        for column, fit in enumerate(fits[row]):
            if fit and column not in seen:
                seen.add(column)
                if column not in owner or assign(owner[column], seen):
                    owner[column] = row
                    return True
        return False

    return all(assign(row, set()) for row in range(len(fits)))


def call_mismatch(
    call: ToolCall, answer: Answer, docs: Mapping[str, Mapping[str, Any]]
) -> str | None:
    """Why ``call`` is not the expected call ``answer``, or None when it is."""
    ((name, allowed),) = answer.items()
    if call.name != name:
        return f"called {call.name!r}, expected {name!r}"
    parameters = docs[name]["parameters"]
    properties = parameters.get("properties", {})
    for param in parameters.get("required", []):
        if param not in call.arguments:
            return f"{name}: missing required argument {param!r}"
    for param, value in call.arguments.items():
        if param not in properties or param not in allowed:
            return f"{name}: unexpected argument {param!r}"
        if not value_matches(value, allowed[param], properties[param].get("type", "any")):
            return f"{name}: argument {param!r}={value!r} is not one of {allowed[param]!r}"
    for param, values in allowed.items():
        if param not in call.arguments and "" not in values:
            return f"{name}: argument {param!r} is missing (allowed values: {values!r})"
    return None


def value_matches(value: Any, allowed: list[Any], bfcl_type: str) -> bool:
    """Whether ``value`` is among ``allowed`` under BFCL's comparison rules (module docstring)."""
    expected = _PYTHON_TYPES.get(bfcl_type)
    if expected is float and type(value) is int:
        value = float(value)
    answer_type = next((type(a) for a in allowed if a != ""), None)
    # Answers of another type than the parameter's name a variable (e.g. "num_items" for an
    # integer): BFCL then accepts that type too and compares values as they are.
    variable = None not in (expected, answer_type) and answer_type is not expected
    if (
        expected is not None
        and type(value) is not expected
        and not (variable and type(value) is answer_type)
    ):
        return False
    if variable:
        return value in allowed
    if isinstance(value, str):
        return _standard(value) in {_standard(a) for a in allowed if isinstance(a, str)}
    if isinstance(value, dict):
        return any(_dict_matches(value, option) for option in allowed if isinstance(option, dict))
    if isinstance(value, list):
        return any(_list_matches(value, option) for option in allowed if isinstance(option, list))
    return value in allowed


def _standard(text: str) -> str:
    return _IGNORED_IN_STRINGS.sub("", text).lower().replace("'", '"')


def _same(value: Any, expected: Any) -> bool:
    if isinstance(value, str) and isinstance(expected, str):
        return _standard(value) == _standard(expected)
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    return bool(value == expected)


def _list_matches(value: list[Any], option: list[Any]) -> bool:
    if option and all(isinstance(o, dict) for o in option):  # a list of dicts
        return len(value) == len(option) and all(
            isinstance(v, dict) and _dict_matches(v, o) for v, o in zip(value, option, strict=True)
        )
    return len(value) == len(option) and all(
        _same(v, o) for v, o in zip(value, option, strict=True)
    )


def _dict_matches(value: dict[str, Any], option: dict[str, list[Any]]) -> bool:
    """``option`` maps each key to its allowed values (``""`` among them: may be left out)."""
    if any(key not in option for key in value):
        return False
    if any(key not in value and "" not in values for key, values in option.items()):
        return False
    return all(any(_same(v, a) for a in option[key]) for key, v in value.items())


# ------------------------------------------------------------------------------ gold calls


def gold_calls(item: BFCLItem) -> list[ToolCall]:
    """One correct answer to ``item``: each expected call with its first allowed values.

    A parameter is left out when ``""`` is its only allowed value, or when the function does
    not define it (a few BFCL answers name such parameters, always as optional).
    """
    calls = []
    for answer in item.answers:
        ((name, allowed),) = answer.items()
        function = next(f for f in item.functions if f["name"] == name)
        defined = function["parameters"].get("properties", {})
        arguments = {
            param: _first([v for v in values if v != ""])
            for param, values in allowed.items()
            if param in defined and any(v != "" for v in values)
        }
        calls.append(ToolCall(name, arguments))
    return calls


def _first(values: list[Any]) -> Any:
    """The first allowed value; dicts (and lists of dicts) hold allowed values per key."""
    value = values[0]
    if isinstance(value, dict):
        return _gold_dict(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_gold_dict(v) for v in value]
    return value


def _gold_dict(option: dict[str, list[Any]]) -> dict[str, Any]:
    return {key: values[0] for key, values in option.items() if values and values[0] != ""}


# ------------------------------------------------------------------------------------ env


class BFCLEnv(SingleTurnEnv[BFCLItem]):
    """BFCL questions, scored by BFCL's AST rules; test split only (see the module docstring)."""

    def __init__(
        self,
        categories: str | Sequence[str] = DEFAULT_CATEGORIES,
        split: str = "test",
        tool_format: str | ToolCallFormat = "hermes",
        system_prompt: str | None = None,
        tools_in_prompt: bool = False,
    ) -> None:
        """Args:
        categories: one category name or several (keys of ``CATEGORIES``); by default
            the five ``DEFAULT_CATEGORIES``.
        split: must be ``"test"``: BFCL is an evaluation set.
        tool_format: how the model writes calls: ``"hermes"``, ``"json"`` or a format.
        system_prompt: a system message put before the question's messages, or None.
        tools_in_prompt: describe the functions and the call syntax in the system message,
            for chat templates that ignore ``tools=``.
        """
        if split != "test":
            raise EnvConfigError(
                f"BFCL is an evaluation set and has only split='test' (got split={split!r}); "
                "training on it would void its score. Train on palaestra/ToolLookup-v0 or your "
                "own ToolEnv, and evaluate here."
            )
        self.split = split
        self.categories = (categories,) if isinstance(categories, str) else tuple(categories)
        self.items = [item for c in self.categories for item in load_category(c)]
        self.format = get_format(tool_format)
        self.system_prompt = system_prompt
        self.tools_in_prompt = tools_in_prompt

    @property
    def num_tasks(self) -> int:
        """How many questions the selected categories hold."""
        return len(self.items)

    def task_at(self, index: int) -> BFCLItem:
        return self.items[index]

    def opening(self, item: BFCLItem) -> tuple[Messages, dict[str, Any]]:
        """The question's messages (after the system message, if any) and its functions."""
        return function_task_opening(
            self.system_prompt,
            self.format,
            item.tools,
            [Message(**m) for m in item.messages],
            tools_in_prompt=self.tools_in_prompt,
            info=StepInfo(task_id=item.item_id, category=item.category, extra=self._extra(item)),
        )

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Score the reply's calls against the possible answers and end the episode."""
        item = self.take_task()
        parsed = self.format.parse(action)
        reason = mismatch(parsed.calls, item)
        if reason is None and parsed.errors and item.category not in IRRELEVANCE:
            reason = f"unreadable call: {parsed.errors[0]}"
        correct = 1.0 if reason is None else 0.0
        info = StepInfo(
            task_id=item.item_id,
            category=item.category,
            success=reason is None,
            tool_calls=len(parsed.calls),
            parse_errors=len(parsed.errors),
            reward_components={"correct": correct},
            extra={**self._extra(item), "mismatch": reason},
        )
        return [], correct, True, False, info.to_info()

    def _extra(self, item: BFCLItem) -> dict[str, Any]:
        return {"split": self.split, "answer": [dict(a) for a in item.answers]}
