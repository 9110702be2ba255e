"""Audit a chat template for what token-exact multi-turn training needs.

``audit_template(tokenizer)`` renders small conversations and checks:

- **generation prompt**: ``add_generation_prompt`` appends an assistant header.
- **end of turn**: an assistant turn ends with the tokenizer's eos token, so a model that
  stops on eos closes its turn the way the template does.
- **prefix extension**: across user, assistant and tool turns, the conversation so far plus
  the sampled assistant text is a prefix of the conversation with the next messages. This is
  what ``ChatRenderer.continuation_ids`` relies on to keep an episode one token sequence.
- **tools in prompt**: tool schemas passed as ``tools=`` appear in the rendered prompt.
- **history kept**: earlier assistant turns render unchanged once later turns exist
  (templates that strip reasoning from history fail this).

Each check gets a verdict and what palaestra does about it. The audit reads templates only;
it loads no model weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROBE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "palaestra_probe_lookup",
        "description": "Look up a value.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"}}},
    },
}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the code word?"},
    {"role": "assistant", "content": "<think>check the tool</think>Let me look it up."},
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
    return [
        _generation_prompt(tokenizer),
        _end_of_turn(tokenizer),
        _prefix_extension(tokenizer),
        _tools_in_prompt(tokenizer),
        _history_kept(tokenizer),
    ]


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs: Any
) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, **kwargs))


def _generation_prompt(tok: PreTrainedTokenizerBase) -> Check:
    base = CONVERSATION[:2]
    header = _render(tok, base, add_generation_prompt=True)[len(_render(tok, base)) :]
    return Check(
        "generation prompt",
        bool(header),
        f"appends {header!r}"
        if header
        else "adds nothing: the model is not told to answer; palaestra cannot prompt it correctly",
    )


def _end_of_turn(tok: PreTrainedTokenizerBase) -> Check:
    text = _render(tok, CONVERSATION[:3])
    end = text.rsplit(CONVERSATION[2]["content"], 1)[-1]
    eos = tok.eos_token or ""
    ok = bool(eos) and end.startswith(eos)
    return Check(
        "end of turn",
        ok,
        f"assistant turns end with {end!r}; eos is {eos!r}"
        + (
            ""
            if ok
            else ": a model stopping on eos leaves the turn open; palaestra appends the "
            "template's closing text as env tokens (mask 0)"
        ),
    )


def _prefix_extension(tok: PreTrainedTokenizerBase) -> Check:
    eos = tok.eos_token or ""
    for k, message in enumerate(CONVERSATION):
        if message["role"] != "assistant" or k + 1 >= len(CONVERSATION):
            continue
        sampled = (
            _render(tok, CONVERSATION[:k], add_generation_prompt=True) + message["content"] + eos
        )
        after = _render(tok, CONVERSATION[: k + 2], add_generation_prompt=True)
        if not after.startswith(sampled):
            return Check(
                "prefix extension",
                False,
                f"after the assistant turn {k}, adding a {CONVERSATION[k + 1]['role']} message "
                "re-renders earlier text; palaestra raises TemplateDriftError for such episodes "
                "rather than train on tokens that were never sampled",
            )
    return Check(
        "prefix extension",
        True,
        "every turn extends the previous tokens; multi-turn episodes stay one sequence",
    )


def _tools_in_prompt(tok: PreTrainedTokenizerBase) -> Check:
    name = PROBE_TOOL["function"]["name"]
    rendered = _render(tok, CONVERSATION[:2], tools=[PROBE_TOOL], add_generation_prompt=True)
    ok = name in rendered
    return Check(
        "tools in prompt",
        ok,
        "tool schemas passed as tools= are rendered"
        if ok
        else "the template ignores tools=: set the env's tools_in_prompt: true so the tool "
        "descriptions go into the system prompt instead",
    )


def _history_kept(tok: PreTrainedTokenizerBase) -> Check:
    earlier = CONVERSATION[2]["content"]
    ok = earlier in _render(tok, CONVERSATION)
    return Check(
        "history kept",
        ok,
        "earlier assistant turns render as sampled"
        if ok
        else "earlier assistant turns are rewritten (e.g. reasoning stripped); multi-turn "
        "episodes on this template raise TemplateDriftError",
    )


def format_report(model: str, checks: list[Check]) -> str:
    """A readable verdict per check."""
    lines = [f"chat template audit: {model}"]
    for check in checks:
        lines.append(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    lines.append(f"{sum(c.passed for c in checks)} of {len(checks)} checks pass")
    return "\n".join(lines)
