"""Tool-call formats: parsing calls out of text, malformed calls, rendering, result messages."""

from __future__ import annotations

import pytest

from palaestra.envs import (
    EnvConfigError,
    HermesFormat,
    JsonFormat,
    ParsedTurn,
    ToolCall,
    ToolResult,
    get_format,
)

WEATHER = ToolCall("get_weather", {"city": "Oslo"})
TIME = ToolCall("get_time", {"zone": "CET", "hours": [1, 2]})


def test_hermes_reads_several_calls_and_keeps_the_prose() -> None:
    text = (
        "Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET", "hours": [1, 2]}}</tool_call>'
    )

    assert HermesFormat().parse(text) == ParsedTurn("Let me check.", (WEATHER, TIME))


def test_hermes_reads_an_unclosed_last_call_and_string_arguments() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'

    assert HermesFormat().parse(text).calls == (WEATHER,)


def test_hermes_reports_each_malformed_call() -> None:
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"</tool_call>'
        '<tool_call>{"arguments": {}}</tool_call>'
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET", "hours": [1, 2]}}</tool_call>'
    )

    parsed = HermesFormat().parse(text)

    assert parsed.calls == (TIME,) and not parsed.is_final
    assert parsed.errors == (
        "tool call 1 is not valid JSON (Expecting ',' delimiter at line 1 column 53)",
        'tool call 2 has no tool name: write {"name": "<tool>", "arguments": {...}}',
        "tool call 3 (f): 'arguments' must be a JSON object, got [1]",
    )


def test_text_without_calls_is_final() -> None:
    parsed = HermesFormat().parse("The answer is \\boxed{4}.")

    assert parsed == ParsedTurn("The answer is \\boxed{4}.") and parsed.is_final


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        '  [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
        'Checking.\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```',
        'Checking.\n```\n[{"name": "get_weather", "arguments": {"city": "Oslo"}}]\n```',
    ],
)
def test_json_reads_a_call_or_list_whole_or_fenced(text: str) -> None:
    parsed = JsonFormat().parse(text)

    assert parsed.calls == (WEATHER,) and parsed.errors == ()
    assert parsed.content in ("", "Checking.")


def test_json_errors_and_final_answers() -> None:
    assert JsonFormat().parse("It is 4.").is_final
    assert JsonFormat().parse('{"name": "get_weather", ').errors == (
        "the tool call is not valid JSON (Expecting property name enclosed in double quotes at "
        "line 1 column 24)",
    )
    assert JsonFormat().parse("[1]").errors == (
        "tool call 1 must be a JSON object with 'name' and 'arguments', got 1",
    )


@pytest.mark.parametrize("fmt", [HermesFormat(), JsonFormat()])
@pytest.mark.parametrize("calls", [[WEATHER], [WEATHER, TIME]])
@pytest.mark.parametrize("content", ["", "Let me look."])
def test_render_is_read_back_by_parse(fmt, calls: list[ToolCall], content: str) -> None:
    assert fmt.parse(fmt.render(calls, content)) == ParsedTurn(content, tuple(calls))


def test_result_messages_as_tool_or_user_turns() -> None:
    results = [ToolResult("get_weather", "sunny"), ToolResult(None, "Error: bad JSON", True)]

    assert HermesFormat().result_messages(results) == [
        {"role": "tool", "content": "sunny", "name": "get_weather"},
        {"role": "tool", "content": "Error: bad JSON"},
    ]
    assert HermesFormat(result_role="user").result_messages(results) == [
        {
            "role": "user",
            "content": "<tool_response>\nsunny\n</tool_response>\n"
            "<tool_response>\nError: bad JSON\n</tool_response>",
        }
    ]
    assert JsonFormat(result_role="user").result_messages(results) == [
        {
            "role": "user",
            "content": '[{"name": "get_weather", "result": "sunny"}, '
            '{"name": null, "result": "Error: bad JSON"}]',
        }
    ]


def test_instructions_list_the_tools_and_the_syntax() -> None:
    spec = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}

    text = HermesFormat().instructions([spec])

    assert '"name": "get_weather"' in text and "<tool_call>" in text
    assert '"name": "get_weather"' in JsonFormat().instructions([spec])


def test_get_format_by_name() -> None:
    assert get_format("hermes") == HermesFormat() and get_format("json") == JsonFormat()
    fmt = JsonFormat(result_role="user")
    assert get_format(fmt) is fmt
    with pytest.raises(EnvConfigError, match="unknown tool-call format 'xml'"):
        get_format("xml")
