"""Tool-call formats: how tool calls are written in assistant text, and how results come back.

A ``ToolCallFormat`` turns an assistant message into a ``ParsedTurn`` (the prose, the
well-formed ``ToolCall``s, and one sentence per malformed call), writes calls back as text
(``render``, the inverse of ``parse``: scripted episodes, SFT data, gold answers), turns
tool results into the observation messages the model reads next, and describes the tools
and the call syntax in words for chat templates that ignore ``tools=``. Two formats ship:

- ``HermesFormat`` (``"hermes"``): Hermes / Qwen style, any number of
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in one message.
- ``JsonFormat`` (``"json"``): the whole reply, or a ```` ```json ```` fenced block in it,
  is one call object or a list of them.

Parsing never raises: a block that is not JSON, or JSON that is not a call, becomes an
entry of ``ParsedTurn.errors`` for the env to show the model.

Why here and not in ``agent``, although the chat renderer and the template audit there use
them too: the env parses the assistant's text (the action) to decide what happens next,
while the agent only renders calls and describes tools. Layers flow ``envs`` <- ``agent``
(the agent imports the envs, never the reverse), so the formats both sides need live on
the lower side, and the agent imports them from here.

What this module does not do: run tools or check arguments against a schema (``tools.py``),
or handle native tool-call fields of chat APIs (``message["tool_calls"]``): actions are text.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from palaestra.envs.core import Message, Messages
from palaestra.envs.errors import EnvConfigError

ResultRole = Literal["tool", "user"]


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call the model wrote."""

    name: str
    """The tool's name, as written (it may name no tool the env has)."""
    arguments: dict[str, Any]
    """The JSON arguments object, not yet checked against the tool's schema."""


@dataclass(frozen=True)
class ParsedTurn:
    """What one assistant message says: prose, tool calls, malformed calls."""

    content: str
    """The message text outside the tool calls, stripped."""
    calls: tuple[ToolCall, ...] = ()
    """The well-formed calls, in the order written."""
    errors: tuple[str, ...] = ()
    """One sentence per call that could not be read (bad JSON, no name, ...)."""

    @property
    def is_final(self) -> bool:
        """True when the message neither calls a tool nor tries to: it is the final answer."""
        return not self.calls and not self.errors


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call (or one unreadable call attempt), as the model will read it."""

    name: str | None
    """The tool called; None for a call that could not be parsed."""
    content: str
    """The result text, or the error text starting with ``"Error: "``."""
    is_error: bool = False
    """Whether the call failed (unknown tool, bad arguments, exception, timeout, parse error)."""


@runtime_checkable
class ToolCallFormat(Protocol):
    """How tool calls are written in assistant text and how results are shown back."""

    @property
    def name(self) -> str:
        """Short name used in configs (``"hermes"``, ``"json"``)."""
        ...

    def parse(self, text: str) -> ParsedTurn:
        """Split an assistant message into prose, calls and errors; never raises."""
        ...

    def render(self, calls: Sequence[ToolCall], content: str = "") -> str:
        """The assistant text that ``parse`` reads back as ``content`` and ``calls``."""
        ...

    def result_messages(self, results: Sequence[ToolResult]) -> Messages:
        """The observation messages that carry ``results`` to the model."""
        ...

    def instructions(self, tools: Sequence[Mapping[str, Any]]) -> str:
        """A system-prompt text listing ``tools`` (function-tool specs) and the call syntax."""
        ...


def call_from_json(value: Any, where: str) -> ToolCall | str:
    """A ``ToolCall`` from a decoded ``{"name", "arguments"}`` object, or the error sentence.

    ``arguments`` may also be a JSON string holding an object (some models write that), and
    may be left out for a tool without parameters.
    """
    if not isinstance(value, dict):
        return f"{where} must be a JSON object with 'name' and 'arguments', got {_short(value)}"
    name, arguments = value.get("name"), value.get("arguments", {})
    if not isinstance(name, str) or not name:
        return f'{where} has no tool name: write {{"name": "<tool>", "arguments": {{...}}}}'
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        return f"{where} ({name}): 'arguments' must be a JSON object, got {_short(arguments)}"
    return ToolCall(name=name, arguments=arguments)


def _turn(content: str, read: Sequence[ToolCall | str]) -> ParsedTurn:
    """A ``ParsedTurn`` from the prose and the calls read (error sentences among them)."""
    calls = tuple(item for item in read if isinstance(item, ToolCall))
    errors = tuple(item for item in read if isinstance(item, str))
    return ParsedTurn(content=content.strip(), calls=calls, errors=errors)


def _decode(text: str, where: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return (
            None,
            f"{where} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})",
        )


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _call_json(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)


def _tool_messages(results: Sequence[ToolResult]) -> Messages:
    """One ``role: tool`` message per result (chat templates group consecutive ones)."""
    messages: Messages = []
    for result in results:
        message = Message(role="tool", content=result.content)
        if result.name is not None:
            message["name"] = result.name
        messages.append(message)
    return messages


def _tool_list(tools: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(json.dumps(spec, ensure_ascii=False) for spec in tools)


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class HermesFormat:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, as Hermes and Qwen write.

    A last block left unclosed (the model stopped right after the JSON) is still read.
    """

    result_role: ResultRole = "tool"
    """``"tool"``: one ``role: tool`` message per result (the template wraps them, e.g. in
    ``<tool_response>``); ``"user"``: one user message of ``<tool_response>`` blocks, for
    templates without a tool role."""
    name: str = "hermes"

    def parse(self, text: str) -> ParsedTurn:
        read: list[ToolCall | str] = []
        for number, block in enumerate(_HERMES_BLOCK.findall(text), start=1):
            where = f"tool call {number}"
            decoded, error = _decode(block.strip(), where)
            read.append(error if error is not None else call_from_json(decoded, where))
        return _turn(_HERMES_BLOCK.sub("", text), read)

    def render(self, calls: Sequence[ToolCall], content: str = "") -> str:
        blocks = [f"<tool_call>\n{_call_json(call)}\n</tool_call>" for call in calls]
        return "\n".join([content, *blocks] if content else blocks)

    def result_messages(self, results: Sequence[ToolResult]) -> Messages:
        if self.result_role == "tool":
            return _tool_messages(results)
        blocks = [f"<tool_response>\n{result.content}\n</tool_response>" for result in results]
        return [Message(role="user", content="\n".join(blocks))]

    def instructions(self, tools: Sequence[Mapping[str, Any]]) -> str:
        return (
            "You may call one or more functions to help with the task. The functions, as "
            f"JSON schemas:\n<tools>\n{_tool_list(tools)}\n</tools>\n"
            "To call a function, write\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>\nThe results come back in the next message. When you have the "
            "answer, reply without any tool call."
        )


_JSON_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class JsonFormat:
    """Plain JSON: a call object ``{"name", "arguments"}`` or a list of them.

    The calls are the whole reply, or the first ```` ```json ```` (or bare ```` ``` ````)
    fenced block in it. A reply that is neither (no fence, and not starting with ``{`` or
    ``[``) calls no tool.
    """

    result_role: ResultRole = "tool"
    """``"tool"``: one ``role: tool`` message per result; ``"user"``: one user message
    holding a JSON list of ``{"name", "result"}`` objects."""
    name: str = "json"

    def parse(self, text: str) -> ParsedTurn:
        fence = _JSON_FENCE.search(text)
        if fence is not None:
            body, content = fence.group(1), (text[: fence.start()] + text[fence.end() :])
        elif text.lstrip().startswith(("{", "[")):
            body, content = text, ""
        else:
            return ParsedTurn(content=text.strip())
        decoded, error = _decode(body.strip(), "the tool call")
        if error is not None:
            return ParsedTurn(content=content.strip(), errors=(error,))
        items = decoded if isinstance(decoded, list) else [decoded]
        read = [call_from_json(item, f"tool call {n}") for n, item in enumerate(items, start=1)]
        return _turn(content, read)

    def render(self, calls: Sequence[ToolCall], content: str = "") -> str:
        if not calls:
            return content
        objects = [{"name": call.name, "arguments": call.arguments} for call in calls]
        body = json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)
        return f"{content}\n```json\n{body}\n```" if content else body

    def result_messages(self, results: Sequence[ToolResult]) -> Messages:
        if self.result_role == "tool":
            return _tool_messages(results)
        listed = [{"name": result.name, "result": result.content} for result in results]
        return [Message(role="user", content=json.dumps(listed, ensure_ascii=False))]

    def instructions(self, tools: Sequence[Mapping[str, Any]]) -> str:
        return (
            "You may call functions to help with the task. The functions, as JSON schemas:\n"
            f"{_tool_list(tools)}\n"
            'To call a function, reply with only a JSON object {"name": <function-name>, '
            '"arguments": <args-json-object>}, or a JSON list of such objects to make '
            "several calls. The results come back in the next message. When you have the "
            "answer, reply in plain text without JSON."
        )


TOOL_CALL_FORMATS: dict[str, type[HermesFormat] | type[JsonFormat]] = {
    "hermes": HermesFormat,
    "json": JsonFormat,
}
"""The built-in formats by config name."""


def get_format(spec: str | ToolCallFormat) -> ToolCallFormat:
    """A format instance from its config name (``"hermes"``, ``"json"``) or as given."""
    if not isinstance(spec, str):
        return spec
    if spec not in TOOL_CALL_FORMATS:
        raise EnvConfigError(
            f"unknown tool-call format {spec!r}; built-in formats: {sorted(TOOL_CALL_FORMATS)}. "
            "Pass a ToolCallFormat instance for your own."
        )
    return TOOL_CALL_FORMATS[spec]()
