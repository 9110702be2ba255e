"""``ToolEnv``: multi-turn tool use, defined as a task source + tools + a verifier.

A new tool-use env subclasses ``ToolEnv``, passes its tasks and tools to ``__init__`` and
implements ``verify(task, answer) -> float`` (the score of a final answer, 0 to 1)::

    class AddEnv(ToolEnv):
        def __init__(self, split="train", **kwargs):
            super().__init__(make_tasks(split), tools=[add], split=split, **kwargs)

        def verify(self, task, answer):
            return float(extract_answer(answer) == task.answer)

One episode is one task. ``reset`` returns the system message and the question, with the
tools' JSON schemas in ``info["tools"]`` (the chat template renders them) and, in
``info["tool_instructions"]``, the format's description of the tools and the call syntax
(the renderer puts it in the system message for templates that ignore ``tools=``). Each
``step`` parses the assistant message with the configured ``ToolCallFormat``:

- calls (or malformed call attempts) → the tools run, and their results come back as the
  observation (``role: tool`` messages, or a user message if the format says so); the
  episode goes on with reward 0. Unknown tools, bad arguments, exceptions, unreadable
  calls and calls past the budget all become ``"Error: ..."`` results the model reads,
  never exceptions: they are the policy's mistakes.
- a tool that fails for infrastructure reasons (it runs past its time limit, or raises
  ``ToolInfraError``) → the episode ends at once, truncated, reward 0, with
  ``info["stop_reason"] = "tool_error"`` and the failure in ``info["error"]``: the rollout
  keeps such episodes out of training. A tool whose slowness is the model's doing (running
  the model's code) should bound that work itself and return the timeout as its result.
- no call → the message is the final answer: ``verify`` scores it, the reward is that
  score (``info["reward_components"]["correct"]``), and the episode terminates.
- a message that still calls tools on turn ``max_turns`` ends the episode truncated,
  reward 0, with ``info["max_turns_reached"] = True``; its calls are not run.

A step whose message held a malformed call (unreadable, unknown tool, bad arguments) sets
``info["stop_reason"] = "parse_error"``: the episode's stop reason if it ends there.

Every step's info (built as a ``StepInfo``) carries the running counter ``turn`` and the
tool-call counts: ``tool_calls`` (calls run or refused), ``tool_errors`` (calls whose result
is an error), ``parse_errors`` (call attempts that could not be read), ``unknown_tools``,
``bad_arguments`` and ``tool_exceptions`` (calls whose tool raised on the model's input);
the last step adds ``success`` (score 1).

``step`` runs sync tools in daemon threads and async tools in a fresh event loop; ``astep``
(what the rollout calls) awaits async tools directly and runs a turn's calls concurrently.

What this module does not do: persist state between episodes (tools that need per-episode
state read it from ``self.task``), sandbox tools, or give partial rewards for tool use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from palaestra.envs.core import Message, Messages, TextEnv
from palaestra.envs.errors import (
    EnvConfigError,
    ResetNeededError,
    ToolArgumentError,
    ToolCallError,
    ToolInfraError,
    ToolTimeoutError,
)
from palaestra.envs.step_info import EnvStopReason, StepInfo
from palaestra.envs.tasks import Split, Task, TaskSource, check_split, pick_task_index
from palaestra.envs.tool_calls import ParsedTurn, ToolCall, ToolCallFormat, ToolResult, get_format
from palaestra.envs.tools import Tool, as_tool

DEFAULT_SYSTEM_PROMPT = (
    "Use the tools to look up what you need; do not guess. When you know the answer, "
    "reply without calling a tool and put the final answer in \\boxed{}."
)
"""The default system message of a ``ToolEnv``."""

Outcome = tuple[Messages, float, bool, bool, dict[str, Any]]


@dataclass
class EpisodeStats:
    """Running counters of one episode (reported in every step's info, as ``StepInfo``'s
    tool-call counts)."""

    turn: int = 0
    """Assistant messages played so far."""
    tool_calls: int = 0
    """Well-formed calls run or refused (over budget, unknown tool)."""
    tool_errors: int = 0
    """Calls whose result was an error: unknown tool, bad arguments, exception, timeout,
    over budget."""
    parse_errors: int = 0
    """Call attempts that could not be read (bad JSON, no tool name)."""
    unknown_tools: int = 0
    """Calls naming a tool the env does not have."""
    bad_arguments: int = 0
    """Calls whose arguments the tool's schema refused."""
    tool_exceptions: int = 0
    """Calls whose tool raised on the model's input (``ToolExecutionError``)."""
    calls: list[ToolCall] = field(default_factory=list)
    """Every well-formed call of the episode, in order."""

    @property
    def malformed_calls(self) -> int:
        """Calls the model got wrong in form: unreadable, unknown tool, bad arguments."""
        return self.parse_errors + self.unknown_tools + self.bad_arguments


@dataclass(frozen=True)
class _ToolDown:
    """A call that failed for infrastructure reasons; it ends the episode."""

    name: str
    reason: str


class ToolEnv(TextEnv):
    """Base class of multi-turn tool-use envs; subclasses implement ``verify``."""

    def __init__(
        self,
        tasks: TaskSource | Sequence[Task],
        tools: Sequence[Tool | Callable[..., Any]],
        *,
        split: Split = "train",
        tool_format: str | ToolCallFormat = "hermes",
        max_turns: int = 8,
        max_tool_calls: int = 16,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        tools_in_prompt: bool = False,
    ) -> None:
        """Args:
        tasks: the split's tasks: a ``TaskSource`` (its split must equal ``split``) or a
            plain sequence of ``Task`` already holding only this split's tasks.
        tools: ``Tool``s or typed functions (turned into tools with ``Tool.from_function``).
        split: ``"train"`` or ``"test"``.
        tool_format: how calls are written and results shown: ``"hermes"``, ``"json"`` or a
            ``ToolCallFormat``.
        max_turns: assistant messages per episode; a message that still calls tools on the
            last turn ends the episode truncated.
        max_tool_calls: calls run per episode; later calls get an error result instead.
        system_prompt: the system message, or None for none.
        tools_in_prompt: always describe the tools and the call syntax in the system
            message. Not needed for templates that ignore ``tools=`` (the renderer then
            does it from ``info["tool_instructions"]``, once); useful where a template
            renders tools with a call syntax other than this env's format.
        """
        self.split = check_split(split)
        if isinstance(tasks, TaskSource) and tasks.split != self.split:
            raise EnvConfigError(
                f"the task source serves split {tasks.split!r} but the env was asked for "
                f"split={split!r}. Pass split={tasks.split!r}."
            )
        if len(tasks) == 0:
            raise EnvConfigError(f"{type(self).__name__} got no tasks for split {split!r}.")
        if max_turns < 1 or max_tool_calls < 0:
            raise EnvConfigError(
                f"max_turns must be >= 1 and max_tool_calls >= 0, got {max_turns} and "
                f"{max_tool_calls}."
            )
        self.tasks = tasks
        built = [as_tool(t) for t in tools]
        self.tools = {t.name: t for t in built}
        if len(self.tools) != len(built):
            names = [t.name for t in built]
            raise EnvConfigError(f"tool names must be unique, got {names}.")
        self.format = get_format(tool_format)
        self.max_turns = max_turns
        self.max_tool_calls = max_tool_calls
        self.system_prompt = system_prompt
        self.tools_in_prompt = tools_in_prompt
        self.task: Task | None = None
        """The task of the open episode (None between episodes); tools may read it."""
        self.stats = EpisodeStats()
        self._malformed_before_turn = 0

    def verify(self, task: Task, answer: str) -> float:
        """Score the final answer ``answer`` (the reply text outside tool calls), 0 to 1."""
        raise NotImplementedError(f"{type(self).__name__} must implement verify(task, answer).")

    @property
    def num_tasks(self) -> int:
        """How many tasks the split holds."""
        return len(self.tasks)

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        """The tools' function-tool specs, as ``info["tools"]`` carries them."""
        return [t.schema for t in self.tools.values()]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Messages, dict[str, Any]]:
        """Start an episode: ``options={"task_index": i}`` picks task ``i``, else a seeded draw."""
        super().reset(seed=seed)
        self.task = self.tasks[pick_task_index(options or {}, self.np_random, self.num_tasks)]
        self.stats = EpisodeStats()
        messages = system_messages(
            self.system_prompt, self.format, self.tool_schemas if self.tools_in_prompt else None
        )
        messages.append(Message(role="user", content=self.task.question))
        info = StepInfo(
            task_id=self.task.task_id,
            tools=self.tool_schemas,
            tool_instructions=self.format.instructions(self.tool_schemas),
            extra={"split": self.split, "answer": self.task.answer},
        )
        return messages, info.to_info()

    def step(self, action: str) -> Outcome:
        """Play one assistant message: run its tool calls, or score it as the final answer."""
        task, parsed = self._begin_turn(action)
        if parsed.is_final or self.stats.turn == self.max_turns:
            return self._end(task, parsed)
        plan = self._plan(parsed)
        return self._observe(
            task, [p if isinstance(p, ToolResult) else self._run(*p) for p in plan]
        )

    async def astep(self, action: str) -> Outcome:
        """Async ``step``: awaits async tools and runs the turn's calls concurrently."""
        task, parsed = self._begin_turn(action)
        if parsed.is_final or self.stats.turn == self.max_turns:
            return self._end(task, parsed)
        plan = self._plan(parsed)
        ran = iter(
            await asyncio.gather(*(self._arun(*p) for p in plan if not isinstance(p, ToolResult)))
        )
        return self._observe(task, [p if isinstance(p, ToolResult) else next(ran) for p in plan])

    # ------------------------------------------------------------------------- internals

    def _begin_turn(self, action: str) -> tuple[Task, ParsedTurn]:
        if self.task is None:
            raise ResetNeededError(
                f"{type(self).__name__}.step() was called without an open episode: call "
                "reset() first (the last episode ended)."
            )
        self.stats.turn += 1
        self._malformed_before_turn = self.stats.malformed_calls
        return self.task, self.format.parse(action)

    def _plan(self, parsed: ParsedTurn) -> list[ToolResult | tuple[ToolCall, Tool]]:
        """Each call paired with the tool to run, or its ready error result; then parse errors."""
        plan: list[ToolResult | tuple[ToolCall, Tool]] = []
        for call in parsed.calls:
            self.stats.tool_calls += 1
            self.stats.calls.append(call)
            if self.stats.tool_calls > self.max_tool_calls:
                budget = f"the budget of {self.max_tool_calls} tool calls per episode is used up"
                plan.append(_error(call.name, f"{budget}; answer without tools"))
            elif call.name not in self.tools:
                self.stats.unknown_tools += 1
                known = ", ".join(self.tools) or "none"
                plan.append(_error(call.name, f"there is no tool {call.name!r} (tools: {known})"))
            else:
                plan.append((call, self.tools[call.name]))
        self.stats.parse_errors += len(parsed.errors)
        plan += [_error(None, error) for error in parsed.errors]
        return plan

    def _run(self, call: ToolCall, tool: Tool) -> ToolResult | _ToolDown:
        try:
            return ToolResult(tool.name, tool.call(call.arguments))
        except (ToolCallError, ToolInfraError) as error:
            return self._failed(tool.name, error)

    async def _arun(self, call: ToolCall, tool: Tool) -> ToolResult | _ToolDown:
        try:
            return ToolResult(tool.name, await tool.acall(call.arguments))
        except (ToolCallError, ToolInfraError) as error:
            return self._failed(tool.name, error)

    def _failed(self, name: str, error: ToolCallError | ToolInfraError) -> ToolResult | _ToolDown:
        """The model reads its own mistakes; the tool's infrastructure failures end the episode."""
        if isinstance(error, (ToolTimeoutError, ToolInfraError)):
            return _ToolDown(name, str(error))
        if isinstance(error, ToolArgumentError):
            self.stats.bad_arguments += 1
        else:
            self.stats.tool_exceptions += 1
        return _error(name, str(error))

    def _observe(self, task: Task, results: list[ToolResult | _ToolDown]) -> Outcome:
        down = [r for r in results if isinstance(r, _ToolDown)]
        if down:
            return self._tool_down(task, down[0])
        answered = [r for r in results if isinstance(r, ToolResult)]
        # Results without a tool name are unreadable calls, already counted as parse errors.
        self.stats.tool_errors += sum(r.is_error for r in answered if r.name is not None)
        malformed = self.stats.malformed_calls > self._malformed_before_turn
        info = self._info(
            max_turns_reached=False,
            reward_components={},
            stop_reason=EnvStopReason.PARSE_ERROR if malformed else None,
        )
        return self.format.result_messages(answered), 0.0, False, False, info

    def _end(self, task: Task, parsed: ParsedTurn) -> Outcome:
        self.task = None
        truncated = not parsed.is_final
        score = 0.0 if truncated else float(self.verify(task, parsed.content))
        info = self._info(
            task,
            max_turns_reached=truncated,
            success=score >= 1.0,
            reward_components={"correct": score},
            stop_reason=EnvStopReason.PARSE_ERROR
            if truncated and self._is_malformed(parsed)
            else None,
        )
        return [], score, not truncated, truncated, info

    def _tool_down(self, task: Task, down: _ToolDown) -> Outcome:
        self.task = None
        info = self._info(
            task,
            max_turns_reached=False,
            success=False,
            reward_components={"correct": 0.0},
            stop_reason=EnvStopReason.TOOL_ERROR,
            error=down.reason,
        )
        return [], 0.0, False, True, info

    def _is_malformed(self, parsed: ParsedTurn) -> bool:
        """Whether a message holds a call that is unreadable, unknown or badly argued."""
        return bool(parsed.errors) or any(
            call.name not in self.tools or self.tools[call.name].problems(call.arguments)
            for call in parsed.calls
        )

    def _info(
        self, task: Task | None = None, *, max_turns_reached: bool, **fields: Any
    ) -> dict[str, Any]:
        """A step's info: the ``StepInfo`` ``fields``, the episode's tool-call counts and turn,
        and with ``task`` (the episode's last step) its id and answer."""
        s = self.stats
        extra: dict[str, Any] = {"turn": s.turn, "max_turns_reached": max_turns_reached}
        if task is not None:
            fields["task_id"] = task.task_id
            extra["answer"] = task.answer
        return StepInfo(
            tool_calls=s.tool_calls,
            tool_errors=s.tool_errors,
            parse_errors=s.parse_errors,
            unknown_tools=s.unknown_tools,
            bad_arguments=s.bad_arguments,
            tool_exceptions=s.tool_exceptions,
            extra=extra,
            **fields,
        ).to_info()


def _error(name: str | None, message: str) -> ToolResult:
    return ToolResult(name=name, content=f"Error: {message}", is_error=True)


def system_messages(
    system_prompt: str | None, fmt: ToolCallFormat, described_tools: list[dict[str, Any]] | None
) -> Messages:
    """The system message: ``system_prompt``, then the format's description of
    ``described_tools`` when given (for templates that ignore ``tools=``); none if empty."""
    parts = [system_prompt or ""]
    if described_tools is not None:
        parts.append(fmt.instructions(described_tools))
    content = "\n\n".join(part for part in parts if part)
    return [Message(role="system", content=content)] if content else []


def function_task_opening(
    system_prompt: str | None,
    fmt: ToolCallFormat,
    tools: list[dict[str, Any]],
    conversation: Messages,
    *,
    tools_in_prompt: bool,
    info: StepInfo,
) -> tuple[Messages, dict[str, Any]]:
    """The opening of a single-turn function-calling task (BFCL, FunctionCall): the system
    message (describing ``tools`` when ``tools_in_prompt``), the ``conversation``, and reset's
    ``info`` with the tools and their instructions added (the renderer puts those in the
    prompt where the chat template ignores ``tools=``)."""
    messages = system_messages(system_prompt, fmt, tools if tools_in_prompt else None)
    messages += conversation
    opened = replace(info, tools=tools, tool_instructions=fmt.instructions(tools))
    return messages, opened.to_info()
