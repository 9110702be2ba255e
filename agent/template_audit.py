"""Audit a chat template for what token-exact multi-turn training needs.

``audit_template(tokenizer)`` renders small conversations and checks:

- **generation prompt**: ``add_generation_prompt`` appends an assistant header.
- **end of turn**: an assistant turn ends with the tokenizer's eos token, so a model that
  stops on eos closes its turn the way the template does.
- **prefix extension**: across user, assistant and tool turns, the conversation so far plus
  the sampled assistant text is a prefix of the conversation with the next messages. This is
  what keeps an episode one token sequence (``ChatRenderer.continuation_ids``).
- **history kept**: earlier assistant turns render unchanged once later turns exist
  (templates that strip reasoning from history fail this).
- **tools in prompt**: tool schemas passed as ``tools=`` appear in the rendered prompt.
- **tool-call round trip**: an assistant message holding a ``<tool_call>`` and the tool's
  result both render verbatim, so the model reads its calls and their results as they were.

Each check gets a verdict and what palaestra does about it: only a missing generation
prompt (or no chat template at all) makes training impossible; a template that breaks
prefix extension or rewrites history splits episodes into separate training samples, and
one that ignores ``tools=`` gets the tools described in the system message.
``audit_for_training`` runs the checks a training run needs, logs each verdict, and raises
``ChatTemplateError`` for the fatal one.

The audit reads templates only; it loads no model weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from palaestra.agent.errors import ChatTemplateError
from palaestra.envs.tool_calls import HermesFormat, ToolCall

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROBE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "palaestra_probe_lookup",
        "description": "Look up a value.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}},
    },
}
PROBE_CALL = HermesFormat().render([ToolCall("palaestra_probe_lookup", {"key": "code word"})])
"""A tool call as the model writes it (Hermes format)."""
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the code word?"},
    {"role": "assistant", "content": f"<think>check the tool</think>Let me look.\n{PROBE_CALL}"},
    {"role": "tool", "content": "The code word is aurora."},
    {"role": "assistant", "content": "aurora"},
    {"role": "user", "content": "Thanks."},
]


@dataclass(frozen=True)
class Check:
    """One audit check."""

    name: str
    """Short name of the property checked."""
    passed: bool
    """Whether the template has the property."""
    detail: str
    """What was seen, and what palaestra does about it."""


def audit_template(tokenizer: PreTrainedTokenizerBase) -> list[Check]:
    """Run every check on ``tokenizer``'s chat template."""
    return [_run(name, check, tokenizer) for name, check in _CHECKS.items()]


def audit_for_training(
    tokenizer: PreTrainedTokenizerBase, *, multi_turn: bool, tools: bool
) -> list[Check]:
    """The checks a training run needs, for the caller to show (and logged at debug level).

    Always: generation prompt and end of turn; with ``multi_turn``: prefix extension and
    history kept; with ``tools``: tools in prompt, and the tool-call round trip when also
    ``multi_turn``. Raises ``ChatTemplateError`` when the template cannot prompt the model
    at all; every other failure has a workaround palaestra applies (see ``Check.detail``).
    """
    names = ["generation prompt", "end of turn"]
    if multi_turn:
        names += ["prefix extension", "history kept"]
    if tools:
        names += ["tools in prompt"] + (["tool-call round trip"] if multi_turn else [])
    checks = [_run(name, _CHECKS[name], tokenizer) for name in names]
    for check in checks:  # the caller shows them; debug logs keep a record
        verdict = "ok" if check.passed else "FAIL"
        logger.debug("chat template [%s] %s: %s", verdict, check.name, check.detail)
    if not checks[0].passed:
        raise ChatTemplateError(
            f"the chat template cannot prompt the model for an answer ({checks[0].detail}). "
            "Use a model with a chat template, or set tokenizer.chat_template."
        )
    return checks


def format_report(model: str, checks: list[Check]) -> str:
    """A readable verdict per check."""
    lines = [f"chat template audit: {model}"]
    for check in checks:
        lines.append(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    lines.append(f"{sum(c.passed for c in checks)} of {len(checks)} checks pass")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ checks

Verdict = tuple[bool, str]


def _run(
    name: str, check: Callable[[PreTrainedTokenizerBase], Verdict], tok: PreTrainedTokenizerBase
) -> Check:
    try:
        passed, detail = check(tok)
    except Exception as error:  # a template that cannot render the probe fails the check
        passed, detail = False, f"rendering failed ({type(error).__name__}: {error})"
    return Check(name, passed, detail)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs: Any
) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, **kwargs))


def _generation_prompt(tok: PreTrainedTokenizerBase) -> Verdict:
    base = CONVERSATION[:2]
    header = _render(tok, base, add_generation_prompt=True)[len(_render(tok, base)) :]
    if header:
        return True, f"appends {header!r}"
    return False, "adds nothing: the model is not told to answer; palaestra cannot prompt it"


def _end_of_turn(tok: PreTrainedTokenizerBase) -> Verdict:
    text = _render(tok, CONVERSATION[:3])
    end = text.rsplit(CONVERSATION[2]["content"], 1)[-1]
    eos = tok.eos_token or ""
    if eos and end.startswith(eos):
        return True, f"assistant turns end with {end!r}; eos is {eos!r}"
    return False, (
        f"assistant turns end with {end!r}; eos is {eos!r}: a model stopping on eos leaves "
        "the turn open; palaestra appends the template's closing text as env tokens (mask 0)"
    )


def _prefix_extension(tok: PreTrainedTokenizerBase) -> Verdict:
    eos = tok.eos_token or ""
    for k, message in enumerate(CONVERSATION[:-1]):
        if message["role"] != "assistant":
            continue
        sampled = (
            _render(tok, CONVERSATION[:k], add_generation_prompt=True) + message["content"] + eos
        )
        after = _render(tok, CONVERSATION[: k + 2], add_generation_prompt=True)
        if not after.startswith(sampled):
            return False, (
                f"after assistant turn {k}, adding a {CONVERSATION[k + 1]['role']} message "
                "re-renders earlier text; palaestra splits such episodes there into separate "
                "training samples (the new one's prompt is the whole conversation rendered "
                "afresh), so no token is trained on that was not sampled"
            )
    return True, "every turn extends the previous tokens; multi-turn episodes stay one sequence"


def _history_kept(tok: PreTrainedTokenizerBase) -> Verdict:
    if CONVERSATION[2]["content"] in _render(tok, CONVERSATION):
        return True, "earlier assistant turns render as sampled"
    return False, (
        "earlier assistant turns are rewritten (e.g. reasoning stripped); each turn after "
        "such a rewrite starts a new training sample"
    )


def _tools_in_prompt(tok: PreTrainedTokenizerBase) -> Verdict:
    name = PROBE_TOOL["function"]["name"]
    if name in _render(tok, CONVERSATION[:2], tools=[PROBE_TOOL], add_generation_prompt=True):
        return True, "tool schemas passed as tools= are rendered"
    return False, (
        "the template ignores tools=; palaestra describes the tools and the call syntax in "
        "the system message instead"
    )


def _tool_call_round_trip(tok: PreTrainedTokenizerBase) -> Verdict:
    text = _render(tok, CONVERSATION)
    result = CONVERSATION[3]["content"]
    if PROBE_CALL in text and result in text:
        return True, "assistant tool calls and tool results render verbatim"
    if result not in text:
        return False, (
            "tool messages do not reach the prompt: the model never reads tool results; use "
            "a tool-call format with result_role='user' (e.g. HermesFormat(result_role='user'))"
        )
    return False, (
        "an assistant tool call is rewritten in history; palaestra splits episodes after "
        "such turns, and the model reads its earlier calls as the template rewrote them"
    )


_CHECKS: dict[str, Callable[[PreTrainedTokenizerBase], Verdict]] = {
    "generation prompt": _generation_prompt,
    "end of turn": _end_of_turn,
    "prefix extension": _prefix_extension,
    "history kept": _history_kept,
    "tools in prompt": _tools_in_prompt,
    "tool-call round trip": _tool_call_round_trip,
}
