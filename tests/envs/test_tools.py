"""Tools from Python functions: schemas from hints and docstrings, validation, time limits."""

from __future__ import annotations

import asyncio
import threading
from typing import Literal, Optional

import pytest

from palaestra.envs import (
    Tool,
    ToolArgumentError,
    ToolDefinitionError,
    ToolExecutionError,
    ToolInfraError,
    ToolTimeoutError,
    tool,
)
from palaestra.envs.tools import parse_docstring, result_text


def get_weather(city: str, unit: Literal["C", "F"] = "C", days: int = 1) -> str:
    """Current weather in a city.

    Looks the city up in the forecast service.

    Args:
        city: The city's name,
            e.g. "Paris".
        unit (str): Temperature unit.
        days: How many days to forecast.

    Returns:
        A short forecast.
    """
    return f"{city}: 20 {unit} for {days} day(s)"


def test_schema_from_hints_and_google_docstring() -> None:
    assert Tool.from_function(get_weather).schema == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.\n\nLooks the city up in the forecast service.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": 'The city\'s name, e.g. "Paris".'},
                    "unit": {
                        "type": "string",
                        "enum": ["C", "F"],
                        "description": "Temperature unit.",
                        "default": "C",
                    },
                    "days": {
                        "type": "integer",
                        "description": "How many days to forecast.",
                        "default": 1,
                    },
                },
                "required": ["city"],
            },
        },
    }


def search(
    query: str,
    tags: list[str],
    weights: dict[str, float],
    limit: Optional[int] = None,  # noqa: UP045 (the typing spelling is tested too)
    exact: bool = False,
    score: float | str = 0.5,
) -> list[str]:
    """Search the index.

    Parameters
    ----------
    query : str
        What to look for.
    tags : list of str
        Tags that must
        all match.
    weights : dict
        Per-field weights.

    Returns
    -------
    list
        Matching ids.
    """
    return []


def test_schema_of_containers_optionals_and_numpy_docstring() -> None:
    parameters = Tool.from_function(search).parameters

    assert parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Tags that must all match.",
            },
            "weights": {
                "type": "object",
                "additionalProperties": {"type": "number"},
                "description": "Per-field weights.",
            },
            "limit": {"type": ["integer", "null"], "default": None},
            "exact": {"type": "boolean", "default": False},
            "score": {"type": ["number", "string"], "default": 0.5},
        },
        "required": ["query", "tags", "weights"],
    }


def test_decorator_overrides_name_description_and_timeout() -> None:
    @tool(name="add_numbers", description="Add.", timeout=3)
    def add(a: int, b: int) -> int:
        return a + b

    assert isinstance(add, Tool)
    assert (add.name, add.description, add.timeout) == ("add_numbers", "Add.", 3)
    assert add.function(2, 3) == 5


def test_bound_method_tool_leaves_out_self() -> None:
    class Shop:
        def price(self, item: str) -> int:
            """Price of an item."""
            return len(item)

    made = Tool.from_function(Shop().price)

    assert made.parameters["required"] == ["item"] and made.call({"item": "abc"}) == "3"


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (lambda x: x, "no type hint"),
        (lambda *args: 0, r"\*args"),
    ],
)
def test_untyped_functions_are_refused(function, message: str) -> None:
    with pytest.raises(ToolDefinitionError, match=message):
        Tool.from_function(function)


def test_hint_without_json_equivalent_is_refused() -> None:
    def at(when: complex) -> None:
        """Bad hint."""

    with pytest.raises(ToolDefinitionError, match="no JSON schema equivalent"):
        Tool.from_function(at)


def test_parse_docstring_without_sections() -> None:
    assert parse_docstring("Just a summary\nover two lines.") == (
        "Just a summary over two lines.",
        {},
    )


# ------------------------------------------------------------------------------ validation


def test_valid_arguments_are_called_and_the_result_is_text() -> None:
    weather = Tool.from_function(get_weather)

    assert weather.call({"city": "Oslo", "unit": "F"}) == "Oslo: 20 F for 1 day(s)"
    assert weather.call({"city": "Oslo", "days": 2.0}) == "Oslo: 20 C for 2 day(s)"  # 2.0 -> 2


def test_every_argument_problem_is_listed() -> None:
    weather = Tool.from_function(get_weather)

    with pytest.raises(ToolArgumentError) as caught:
        weather.call({"unit": "K", "days": "2", "country": "NO"})

    assert str(caught.value) == (
        "tool 'get_weather' got invalid arguments: missing required argument 'city'; "
        'argument \'unit\' must be one of "C", "F", got "K"; '
        "argument 'days' must be integer, got \"2\"; "
        "unexpected argument 'country' (it takes 'city', 'unit', 'days')."
    )


def test_nested_values_are_checked() -> None:
    searcher = Tool.from_function(search)

    with pytest.raises(ToolArgumentError, match=r"argument 'tags'\[1\] must be string, got 3"):
        searcher.call({"query": "q", "tags": ["a", 3], "weights": {}})
    with pytest.raises(ToolArgumentError, match=r"'weights'\['x'\] must be number, got true"):
        searcher.call({"query": "q", "tags": [], "weights": {"x": True}})
    assert searcher.call({"query": "q", "tags": [], "weights": {}, "limit": None}) == "[]"


def test_numbers_keep_their_json_kind_and_bools_are_not_numbers() -> None:
    def scale(factor: float, times: int, on: Literal[True] = True) -> str:
        """Scale."""
        return f"{factor!r} {times!r}"

    scaler = Tool.from_function(scale)

    assert scaler.call({"factor": 2, "times": 3.0}) == "2 3"  # an int stays an int
    assert scaler.problems({"factor": True, "times": False, "on": 1}) == [
        "argument 'factor' must be number, got true",
        "argument 'times' must be integer, got false",
        "argument 'on' must be one of true, got 1",
    ]
    assert scaler.problems({"factor": 1.5, "times": 1}) == []


def test_arguments_must_be_an_object() -> None:
    with pytest.raises(ToolArgumentError, match="must be a JSON object"):
        Tool.from_function(get_weather).call(["Oslo"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        (3, "3"),
        (2.5, "2.5"),
        ({"a": [1, None]}, '{"a": [1, null]}'),
        (True, "true"),
    ],
)
def test_result_text(value, text: str) -> None:
    assert result_text(value) == text


# ------------------------------------------------------------------ exceptions and timeouts


def test_exceptions_become_execution_errors() -> None:
    def divide(a: int, b: int) -> float:
        """Divide."""
        return a / b

    with pytest.raises(ToolExecutionError, match="tool 'divide' raised ZeroDivisionError"):
        Tool.from_function(divide).call({"a": 1, "b": 0})


def test_infrastructure_errors_pass_through_unwrapped() -> None:
    def lookup(key: str) -> str:
        """Reads a remote table."""
        raise ToolInfraError("table server unreachable")

    async def alookup(key: str) -> str:
        """Reads a remote table."""
        raise ToolInfraError("table server unreachable")

    for function in (lookup, alookup):
        with pytest.raises(ToolInfraError, match="unreachable"):
            Tool.from_function(function).call({"key": "a"})
        with pytest.raises(ToolInfraError, match="unreachable"):
            asyncio.run(Tool.from_function(function).acall({"key": "a"}))


def test_sync_tool_past_its_timeout_fails_without_waiting_for_it() -> None:
    release = threading.Event()

    def hang() -> str:
        """Never returns on its own."""
        release.wait()
        return "late"

    with pytest.raises(ToolTimeoutError, match=r"did not finish within 0\.05 s"):
        Tool.from_function(hang, timeout=0.05).call({})
    release.set()


async def test_async_tool_is_awaited_and_timed_out() -> None:
    async def slow(seconds: float) -> str:
        """Sleep, then answer."""
        await asyncio.sleep(seconds)
        return "done"

    made = Tool.from_function(slow, timeout=0.2)

    assert made.is_async and await made.acall({"seconds": 0}) == "done"
    with pytest.raises(ToolTimeoutError):
        await made.acall({"seconds": 10})


async def test_sync_tool_through_acall_runs_off_the_event_loop() -> None:
    release = threading.Event()

    def wait_for_release() -> str:
        """Blocks until released."""
        release.wait(5)
        return "released"

    pending = asyncio.ensure_future(Tool.from_function(wait_for_release).acall({}))
    await asyncio.sleep(0)  # the loop is free while the tool blocks its thread
    release.set()

    assert await pending == "released"


def test_sync_call_of_an_async_tool() -> None:
    async def echo(text: str) -> str:
        """Echo."""
        return text

    assert Tool.from_function(echo).call({"text": "hi"}) == "hi"
