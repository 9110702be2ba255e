"""Tools from typed Python functions: JSON schema, argument validation, time-limited calls.

``Tool.from_function(fn)`` (or the ``@tool`` decorator) reads a function's signature and
docstring and builds the OpenAI function-tool spec that chat templates take as ``tools=``::

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current weather in a city.

        Args:
            city: The city's name.
            unit: Temperature unit.
        '''

    Tool.from_function(get_weather).schema == {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city's name."},
            "unit": {"type": "string", "enum": ["C", "F"], "description": "Temperature unit.",
                     "default": "C"}},
            "required": ["city"]}}}

Type hints map to JSON schema types: ``int`` integer, ``float`` number, ``str`` string,
``bool`` boolean, ``list[X]`` array, ``dict[str, X]`` object, ``Literal[...]`` enum,
``X | None`` a nullable X; a parameter with a default is not required. Per-argument
descriptions come from a Google-style ``Args:`` section or a numpy-style ``Parameters``
section of the docstring; the text before the first section is the tool's description.

pydantic does the typing work: the signature becomes a ``TypedDict`` whose ``TypeAdapter``
validates the arguments (strictly, as JSON gives them: ``"2"`` is no integer, ``2.0`` is)
and writes their JSON schema. What pydantic does not do stays here: descriptions from the
docstring, refusing hints a model cannot fill in, the compact schema dialect tools have
always shown models (no titles; a union of plain types as one ``type`` list), and error
sentences written for the model, every problem in one message.

``Tool.call`` / ``Tool.acall`` validate the arguments against the schema, run the function
under the tool's time limit (async functions with ``asyncio.wait_for``; sync functions in a
daemon thread) and return the result as text. Every failure raises a ``ToolCallError``
whose message is written for the model to read, except ``ToolInfraError``: a tool's function
raises it when the tool's own backend failed (a service unreachable, a sandbox that would
not start), and it passes through unchanged, so tool envs end the episode as an
infrastructure failure instead of showing the model an error it did not cause.

What this module does not do: parse tool calls out of model text (see ``tool_calls.py``),
sandbox the function (it runs in this process with this process's rights), or stop a sync
function that runs past its time limit: its thread is abandoned, not killed, so a tool that
can hang must bound itself or run its work in a sandbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import re
import threading
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin, overload

from pydantic import (
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, Required, TypedDict

from palaestra.envs.errors import (
    ToolArgumentError,
    ToolDefinitionError,
    ToolExecutionError,
    ToolInfraError,
    ToolTimeoutError,
)

DEFAULT_TIMEOUT = 10.0
"""Seconds a tool call may run unless the tool says otherwise."""

JsonSchema = dict[str, Any]


# ------------------------------------------------------------------------------- the Tool


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with its JSON schema and time limit."""

    name: str
    """The name the model calls the tool by (by default the function's name)."""
    description: str
    """What the tool does, shown to the model."""
    parameters: JsonSchema
    """JSON schema of the arguments: ``{"type": "object", "properties": ..., "required": ...}``."""
    function: Callable[..., Any]
    """The Python function (sync or async) the call runs."""
    arguments: TypeAdapter[dict[str, Any]] = field(repr=False, compare=False)
    """pydantic's validator of the arguments, built from the function's signature."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds one call may run before it fails with ``ToolTimeoutError``."""

    @classmethod
    def from_function(
        cls,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Tool:
        """Build a tool from a typed function (or bound method); see the module docstring.

        ``name`` and ``description`` override the function's name and docstring summary.
        Raises ``ToolDefinitionError`` for a parameter without a type hint, a hint with no
        JSON schema equivalent, or ``*args`` / ``**kwargs``.
        """
        if timeout <= 0:
            raise ToolDefinitionError(f"a tool's timeout must be positive, got {timeout}.")
        summary, arg_docs = parse_docstring(inspect.getdoc(function) or "")
        arguments = arguments_adapter(function)
        return cls(
            name=name or function.__name__,
            description=summary if description is None else description,
            parameters=parameters_schema(function, arguments, arg_docs),
            function=function,
            arguments=arguments,
            timeout=timeout,
        )

    @property
    def schema(self) -> JsonSchema:
        """The OpenAI function-tool spec: ``{"type": "function", "function": {...}}``."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    @property
    def is_async(self) -> bool:
        """Whether the function is a coroutine function (awaited rather than threaded)."""
        return inspect.iscoroutinefunction(self.function)

    def call(self, arguments: Mapping[str, Any]) -> str:
        """Validate ``arguments``, run the function under the time limit, return text.

        An async function runs in a fresh event loop (from async code, use ``acall``).
        """
        if self.is_async:
            return asyncio.run(self.acall(arguments))
        kwargs = self.validate(arguments)
        future = _start_in_daemon_thread(self.function, kwargs)
        try:
            return result_text(future.result(timeout=self.timeout))
        except concurrent.futures.TimeoutError:
            raise self._timed_out() from None
        except ToolInfraError:
            raise
        except Exception as error:
            raise self._failed(error) from error

    async def acall(self, arguments: Mapping[str, Any]) -> str:
        """Async ``call``: awaits an async function, runs a sync one in a daemon thread."""
        kwargs = self.validate(arguments)
        if self.is_async:
            running: Awaitable[Any] = self.function(**kwargs)
        else:
            running = asyncio.wrap_future(_start_in_daemon_thread(self.function, kwargs))
        try:
            return result_text(await asyncio.wait_for(running, self.timeout))
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        except ToolInfraError:
            raise
        except Exception as error:
            raise self._failed(error) from error

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments for the function, or ``ToolArgumentError`` listing every problem.

        Integral floats given for integer parameters (``3.0``) are passed on as ints.
        """
        kwargs, problems = self._validated(arguments)
        if problems:
            raise ToolArgumentError(
                f"tool {self.name!r} got invalid arguments: {'; '.join(problems)}."
            )
        return kwargs

    def problems(self, arguments: Any) -> list[str]:
        """Every way ``arguments`` break the tool's schema, as short sentences; none if valid."""
        return self._validated(arguments)[1]

    def _validated(self, arguments: Any) -> tuple[dict[str, Any], list[str]]:
        if not isinstance(arguments, Mapping):
            return {}, [f"arguments must be a JSON object, got {_short(arguments)}"]
        try:
            return self.arguments.validate_python(dict(arguments)), []
        except ValidationError as error:
            return {}, argument_problems(error, self.parameters, arguments)

    def _timed_out(self) -> ToolTimeoutError:
        return ToolTimeoutError(f"tool {self.name!r} did not finish within {self.timeout:g} s.")

    def _failed(self, error: Exception) -> ToolExecutionError:
        return ToolExecutionError(f"tool {self.name!r} raised {type(error).__name__}: {error}")


@overload
def tool(function: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Decorator form of ``Tool.from_function``: ``@tool`` or ``@tool(timeout=2)``.

    The decorated name is bound to the ``Tool``; the plain function stays at ``.function``.
    """

    def build(fn: Callable[..., Any]) -> Tool:
        return Tool.from_function(fn, name=name, description=description, timeout=timeout)

    return build if function is None else build(function)


def as_tool(item: Tool | Callable[..., Any]) -> Tool:
    """``item`` if it is a ``Tool``, else ``Tool.from_function(item)``."""
    return item if isinstance(item, Tool) else Tool.from_function(item)


def result_text(result: Any) -> str:
    """A tool's return value as the text the model reads: strings as they are, else JSON."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)


def _start_in_daemon_thread(
    function: Callable[..., Any], kwargs: dict[str, Any]
) -> concurrent.futures.Future[Any]:
    """Run ``function(**kwargs)`` in a new daemon thread, so a hung call never blocks exit."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(**kwargs))
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name=f"tool:{function.__name__}", daemon=True).start()
    return future


# ----------------------------------------------------------------------- schema from hints


def arguments_adapter(function: Callable[..., Any]) -> TypeAdapter[dict[str, Any]]:
    """pydantic's strict validator of ``function``'s keyword arguments, as a ``TypedDict``.

    Raises ``ToolDefinitionError`` for ``*args`` / ``**kwargs``, a parameter without a type
    hint, or a hint outside those the module docstring lists.
    """
    where = getattr(function, "__qualname__", repr(function))
    try:
        hints = typing.get_type_hints(function)
    except Exception as error:
        raise ToolDefinitionError(f"{where}: cannot resolve its type hints ({error}).") from error
    fields: dict[str, Any] = {}
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDefinitionError(
                f"{where}: *args and **kwargs cannot be described to a model; name every parameter."
            )
        if param.name not in hints:
            raise ToolDefinitionError(
                f"{where}: parameter {param.name!r} has no type hint; annotate it (e.g. "
                f"'{param.name}: str') so the model knows what to pass."
            )
        hint = json_hint(hints[param.name], f"{where}({param.name})")
        fields[param.name] = Required[hint] if param.default is param.empty else NotRequired[hint]
    config = ConfigDict(extra="forbid", strict=True)
    return TypeAdapter(with_config(config)(TypedDict("Arguments", fields)))  # type: ignore[operator]


def json_hint(hint: Any, where: str = "type hint") -> Any:
    """``hint`` as pydantic validates JSON for it (integers accept integral floats), or
    ``ToolDefinitionError`` naming ``where`` for a hint a model cannot fill in."""
    if hint is int:
        return _JsonInt
    if hint is float:
        return _JsonNumber
    if hint in (str, bool, list, dict):
        return hint
    origin, args = get_origin(hint), get_args(hint)
    if origin is list:
        return list[json_hint(args[0], where)]  # type: ignore[misc]
    if origin is dict:
        if args[0] is not str:
            raise ToolDefinitionError(f"{where}: JSON object keys are strings; use dict[str, ...].")
        return dict[str, json_hint(args[1], where)]  # type: ignore[misc]
    if origin is Literal:
        kinds = {type(value) for value in args}
        if len(kinds) != 1 or not kinds <= {int, float, str, bool}:
            raise ToolDefinitionError(
                f"{where}: Literal values must all be str, all int, all float or all bool; "
                f"got {args!r}."
            )
        return Annotated[hint, BeforeValidator(functools.partial(_same_kind, bool in kinds))]
    if origin in (Union, types.UnionType):
        members = tuple(a if a is type(None) else json_hint(a, where) for a in args)
        return Union[members]  # noqa: UP007 (built at run time)
    raise ToolDefinitionError(
        f"{where}: {hint!r} has no JSON schema equivalent; use int, float, str, bool, "
        "list[...], dict[str, ...], Literal[...] or Optional[...] of these."
    )


def _integer(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise PydanticCustomError("float_type", "not a number")


def _same_kind(wants_bool: bool, value: Any) -> Any:
    if isinstance(value, bool) != wants_bool:  # JSON tells true from 1; Python's == does not
        raise PydanticCustomError("literal_error", "a bool for a number, or the reverse")
    return value


_JsonInt = Annotated[int, BeforeValidator(_integer)]
"""An integer as JSON may write it: ``2.0`` is passed on as ``2``; ``true`` is refused."""
_JsonNumber = Annotated[float, PlainValidator(_number), WithJsonSchema({"type": "number"})]
"""A JSON number, passed on as written: ``1`` stays an int; ``true`` is refused."""


def parameters_schema(
    function: Callable[..., Any],
    arguments: TypeAdapter[dict[str, Any]],
    arg_docs: Mapping[str, str],
) -> JsonSchema:
    """The ``parameters`` object schema the model sees: pydantic's schema of each argument in
    the tools' dialect (``plain_schema``), with its docstring description and its default."""
    generated = arguments.json_schema()["properties"]
    properties: dict[str, JsonSchema] = {}
    required: list[str] = []
    for param in inspect.signature(function).parameters.values():
        schema = plain_schema(generated[param.name])
        if param.name in arg_docs:
            schema["description"] = arg_docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        elif _is_json_value(param.default):
            schema["default"] = param.default
        properties[param.name] = schema
    return {"type": "object", "properties": properties, "required": required}


def plain_schema(schema: JsonSchema) -> JsonSchema:
    """A pydantic JSON schema in the dialect tools show models: no titles, a one-value
    ``Literal`` as an ``enum``, no empty ``items``, unions of plain types as one ``type``
    list (``["integer", "null"]``), and ``type`` first."""
    out = {key: value for key, value in schema.items() if key != "title"}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for key in ("items", "additionalProperties"):
        if out.get(key) in ({}, True):
            del out[key]
        elif isinstance(out.get(key), dict):
            out[key] = plain_schema(out[key])
    if "anyOf" in out:
        options = [plain_schema(option) for option in out.pop("anyOf")]
        if all(set(option) == {"type"} for option in options):
            out["type"] = [option["type"] for option in options]
        else:
            out["anyOf"] = options
    return dict(sorted(out.items(), key=lambda item: item[0] != "type"))


def _is_json_value(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# -------------------------------------------------------------------------- docstrings

_GOOGLE_ARGS = re.compile(r"^(Args|Arguments|Parameters|Params):\s*$")
_GOOGLE_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")
_NUMPY_UNDERLINE = re.compile(r"^-{3,}\s*$")
_GOOGLE_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ENTRY = re.compile(r"^(\w+)\s*(?::.*)?$")


def parse_docstring(docstring: str) -> tuple[str, dict[str, str]]:
    """Split a cleaned docstring into its summary and per-argument descriptions.

    The summary is the text before the first section header (``Args:``, ``Returns:``, or a
    numpy header underlined with dashes), paragraphs kept, lines joined. Argument
    descriptions come from a Google ``Args:`` section (``name: text`` or
    ``name (type): text``, continuation lines indented) or a numpy ``Parameters`` section
    (``name : type`` then indented text).
    """
    lines = docstring.expandtabs().splitlines()
    first_section = next((i for i in range(len(lines)) if _is_section(lines, i)), len(lines))
    paragraphs = "\n".join(lines[:first_section]).split("\n\n")
    summary = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    arg_docs: dict[str, str] = {}
    for i in range(first_section, len(lines)):
        header = lines[i].strip()
        if _GOOGLE_ARGS.match(header) and not lines[i].startswith(" "):
            arg_docs.update(_section_entries(_section_body(lines, i + 1), _GOOGLE_ENTRY))
        elif header == "Parameters" and _is_section(lines, i):
            arg_docs.update(_section_entries(_section_body(lines, i + 2), _NUMPY_ENTRY))
    return summary, arg_docs


def _is_section(lines: list[str], i: int) -> bool:
    line = lines[i]
    if line.startswith(" ") or not line.strip():
        return False
    underlined = i + 1 < len(lines) and _NUMPY_UNDERLINE.match(lines[i + 1].strip()) is not None
    return underlined or _GOOGLE_SECTION.match(line) is not None


def _section_body(lines: list[str], start: int) -> list[str]:
    """The lines of a section, up to the next section header."""
    end = start
    while end < len(lines) and not _is_section(lines, end):
        end += 1
    return lines[start:end]


def _section_entries(body: list[str], entry: re.Pattern[str]) -> dict[str, str]:
    """``{name: description}`` from a section whose entries sit at its smallest indent."""
    indents = [len(line) - len(line.lstrip()) for line in body if line.strip()]
    if not indents:
        return {}
    base = min(indents)
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in body:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        match = entry.match(line.strip()) if indent == base else None
        if match:
            current = entries.setdefault(match.group(1).lstrip("*"), [])
            current.extend(match.groups()[1:2])
        elif current is not None:
            current.append(line.strip())
    return {name: " ".join(" ".join(parts).split()) for name, parts in entries.items()}


# ------------------------------------------------------------------------------ validation


def argument_problems(
    error: ValidationError, parameters: JsonSchema, arguments: Mapping[str, Any]
) -> list[str]:
    """pydantic's ``error`` as the sentences the model reads: missing arguments first, then
    the given arguments' problems in the order given, one sentence per bad value."""
    order: dict[int | str, int] = {name: i for i, name in enumerate(arguments)}
    errors = sorted(
        error.errors(), key=lambda e: (e["type"] != "missing", order.get(e["loc"][0], -1))
    )
    problems: list[str] = []
    for problem in (_problem(e, parameters["properties"], arguments) for e in errors):
        if problem not in problems:  # each option of a union reports the same value
            problems.append(problem)
    return problems


def _problem(error: Any, properties: Mapping[str, JsonSchema], arguments: Mapping[str, Any]) -> str:
    name, *path = error["loc"]
    if error["type"] == "missing":
        return f"missing required argument {name!r}"
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(map(repr, properties)) or "none"
        return f"unexpected argument {name!r} (it takes {allowed})"
    schema, value, where = properties[name], arguments[name], repr(name)
    for key in path:  # down to the bad value; a choice is judged whole (pydantic names options)
        inner = schema.get("items" if isinstance(key, int) else "additionalProperties")
        if _is_choice(schema) or not isinstance(inner, dict):
            break
        try:
            value = value[key]
        except (LookupError, TypeError):
            break
        schema, where = inner, f"{where}[{key if isinstance(key, int) else repr(key)}]"
    return _value_problem(schema, value, where)


def _is_choice(schema: JsonSchema) -> bool:
    return "anyOf" in schema or "enum" in schema or isinstance(schema.get("type"), list)


def _value_problem(schema: JsonSchema, value: Any, where: str) -> str:
    if "enum" in schema:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        return f"argument {where} must be one of {allowed}, got {_short(value)}"
    if "type" in schema:
        wanted = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        return f"argument {where} must be {' or '.join(wanted)}, got {_short(value)}"
    return f"argument {where} has an unaccepted value {_short(value)}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
