"""``StepInfo``: the typed contract of what an env's ``info`` dicts tell the policy side.

Gymnasium requires ``reset`` and ``step`` to return ``info`` as a dict, and user code reads
its keys (``info["success"]``), so envs keep returning dicts. ``StepInfo`` defines, once and
with their types, the keys palaestra itself reads: an env builds one and returns
``step_info.to_info()``; the rollout, the evaluator and ``check_env`` read a dict back with
``StepInfo.from_info(info, env=...)``, which checks every key it knows and raises
``StepInfoError`` naming the env, the key and what the key must hold. Keys it does not know
ride along in ``extra`` (``answer``, ``split``, ``tests_passed``, ...), unchanged.

Where each key appears (a field left at None is absent from the dict)::

    reset's info       task_id, tools, tool_instructions, category
    every step's info  reward_components (check_env requires it); tool envs: the counts
    a step that ends   success, and where it applies stop_reason, error, reward_hack
    the episode        (task_id and category may be repeated)

What this module does not do: decide how an episode ends (``agent.rollout`` does, from
``stop_reason`` and the step's flags), or know any env's extra keys.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palaestra.envs.errors import StepInfoError


class EnvStopReason(str, enum.Enum):
    """The stop reasons an env may report in ``info["stop_reason"]``.

    Each is also a value of ``agent.trajectory.StopReason``, where the table of all of them
    lives; the rollout adds the reasons only it can see (``max_tokens``, ``timeout``,
    ``engine_error``).
    """

    ANSWERED = "answered"
    """The message was the final answer (what ``terminated`` means without a report)."""
    MAX_TURNS = "max_turns"
    """The env's own turn budget ran out."""
    PARSE_ERROR = "parse_error"
    """The message held a tool call that could not be read, named no tool, or had arguments
    the tool refuses: the policy's failure, trained on if the episode ends here."""
    TOOL_ERROR = "tool_error"
    """A tool failed for infrastructure reasons: the episode ends at once, kept out of
    training (``error`` says what failed)."""
    ENV_ERROR = "env_error"
    """The env's own backend failed: the episode ends at once, kept out of training."""


@dataclass(frozen=True)
class StepInfo:
    """The keys of an env's ``info`` dict that palaestra reads (see the module docstring)."""

    task_id: str | None = None
    """The env's stable name for the task (reset's info; an int id is read as text)."""
    env_id: str | None = None
    """The registered id of the env that plays the episode, where the env the rollout was
    given delegates to another (``EnvMixture`` picks one per task; reset's info)."""
    tools: list[dict[str, Any]] | None = None
    """JSON-schema function-tool specs, for the chat template's ``tools=`` (reset's info)."""
    tool_instructions: str | None = None
    """The tools and the call syntax in words, put in the system message for chat templates
    that ignore ``tools=`` (reset's info)."""
    category: str | None = None
    """The task's category, for success rates per category (e.g. BFCL's)."""
    reward_components: dict[str, float] | None = None
    """This step's reward by named part; every step's info carries one (``check_env``)."""
    success: bool | None = None
    """Whether the episode solved its task (the step that ends it); without it, evaluation
    counts a positive reward as success."""
    stop_reason: EnvStopReason | None = None
    """Why the episode ends if it ends after this step; an infrastructure reason ends it at
    once."""
    error: str | None = None
    """What failed, beside an infrastructure ``stop_reason``."""
    reward_hack: tuple[str, ...] | None = None
    """The reward hacks the env caught in the reply, by name (code envs, and the math env's
    ``"hedge"``; each scores 0)."""
    tool_calls: int | None = None
    """Tool envs: well-formed calls so far this episode, run or refused."""
    tool_errors: int | None = None
    """Tool envs: calls so far whose result was an error."""
    parse_errors: int | None = None
    """Tool envs: call attempts so far that could not be read."""
    unknown_tools: int | None = None
    """Tool envs: calls so far that named a tool the env does not have."""
    bad_arguments: int | None = None
    """Tool envs: calls so far whose arguments the tool's schema refused."""
    tool_exceptions: int | None = None
    """Tool envs: calls so far whose tool raised on the model's input."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Every other key of the dict, passed through unchanged (``answer``, ``split``, ...)."""

    def __post_init__(self) -> None:
        clash = sorted(set(self.extra) & set(_READERS))
        if clash:
            raise StepInfoError(f"StepInfo.extra repeats the typed keys {clash}; set the fields.")

    def to_info(self) -> dict[str, Any]:
        """The gymnasium ``info`` dict: each field that is not None under its own name (an
        enum as its value, ``reward_hack`` as a list), then ``extra``."""
        info: dict[str, Any] = {}
        for name in _READERS:
            value = getattr(self, name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            if value is not None:
                info[name] = value
        return info | dict(self.extra)

    @classmethod
    def from_info(cls, info: Mapping[str, Any], *, env: str = "the env") -> StepInfo:
        """Read an ``info`` dict; ``StepInfoError`` names ``env`` and the first bad key.

        A key holding None counts as absent; keys of no field go to ``extra``.
        """
        typed: dict[str, Any] = {}
        for key, read in _READERS.items():
            value = info.get(key)
            if value is None:
                continue
            try:
                typed[key] = read(value)
            except _Wrong as wrong:
                raise StepInfoError(
                    f"{env} returned info[{key!r}] = {value!r:.120}, but it must be {wrong}. "
                    "See palaestra.envs.StepInfo for the keys palaestra reads."
                ) from None
        extra = {key: value for key, value in info.items() if key not in _READERS}
        return cls(**typed, extra=extra)

    def tool_counts(self) -> dict[str, int]:
        """The tool-call counts this info carries, by field name (for logs)."""
        return {name: count for name in _TOOL_COUNTS if (count := getattr(self, name)) is not None}


class _Wrong(Exception):
    """A value of the wrong type; its text says what the key must hold."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Wrong("a string")
    return value


def _task_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise _Wrong("a string (or an integer)")
    return str(value)


def _tool_specs(value: Any) -> list[dict[str, Any]]:
    if not (isinstance(value, list) and all(isinstance(spec, dict) for spec in value)):
        raise _Wrong("a list of function-tool spec dicts")
    return value


def _components(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(part, numbers.Real) for name, part in value.items()
    ):
        raise _Wrong("a dict of str names to numbers")
    return {name: float(part) for name, part in value.items()}


def _flag(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _Wrong("True or False")
    return bool(value)


def _stop_reason(value: Any) -> EnvStopReason:
    try:
        return EnvStopReason(value)
    except ValueError:
        allowed = ", ".join(repr(reason.value) for reason in EnvStopReason)
        raise _Wrong(f"one of {allowed}") from None


def _names(value: Any) -> tuple[str, ...]:
    if not (isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value)):
        raise _Wrong("a list of strings")
    return tuple(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise _Wrong("a count (an integer >= 0)")
    return int(value)


_TOOL_COUNTS = (
    "tool_calls",
    "tool_errors",
    "parse_errors",
    "unknown_tools",
    "bad_arguments",
    "tool_exceptions",
)

_READERS: dict[str, Callable[[Any], Any]] = {
    "task_id": _task_id,
    "env_id": _text,
    "tools": _tool_specs,
    "tool_instructions": _text,
    "category": _text,
    "reward_components": _components,
    "success": _flag,
    "stop_reason": _stop_reason,
    "error": _text,
    "reward_hack": _names,
    **dict.fromkeys(_TOOL_COUNTS, _count),
}
"""How ``from_info`` reads each typed field's key: the value as the field holds it, or
``_Wrong``; one entry per field but ``extra``, in field order."""
