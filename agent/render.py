"""Chat rendering: messages to prompt token ids, with sampled tokens kept verbatim.

The renderer is the only place where text becomes tokens. It renders the opening messages
with the model's chat template (generation prompt included) and, in multi-turn episodes,
renders only the *new* messages that follow a sampled turn, appending their ids after the
sampled ids. Sampled ids are never decoded and re-encoded, so the tokens the trainer sees
are exactly the tokens the engine produced.

A continuation is derived from the template's text: the earlier conversation followed by
the sampled text must be a prefix of the conversation rendered with the new messages.
Templates that rewrite history (e.g. strip reasoning from earlier turns) break that
property; ``continuation_ids`` then returns None and the rollout starts a new training
sample whose prompt is the whole conversation rendered afresh (``prompt_ids``), rather than
train on tokens that were never sampled.

Tools: the env's JSON-schema specs go to the template as ``tools=``. A template that
ignores them (renders the same text with and without) would leave the model unaware of its
tools, so ``with_tool_instructions`` puts the env's description of the tools and of the
call syntax into the system message instead.

What this module does not do: parse tool calls (``envs.tool_calls``) or choose the call
format (the env does).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from palaestra.envs.core import Message, Messages
from palaestra.envs.tool_calls import HermesFormat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Tools = list[dict[str, Any]] | None
"""JSON-schema function-tool specs, as an env's ``info["tools"]`` carries them."""


class ChatRenderer:
    """Turns chat messages into token ids with a tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._told_tool_fallback = False

    def prompt_ids(self, messages: Messages, tools: Tools = None) -> list[int]:
        """Token ids of ``messages`` followed by the assistant generation prompt."""
        text = self._render(messages, tools, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def continuation_ids(
        self,
        history: Messages,
        sampled_ids: list[int],
        new_messages: Messages,
        tools: Tools = None,
    ) -> list[int] | None:
        """Ids to append after a sampled turn so the model can answer ``new_messages``, or
        None when the template does not render the conversation as an extension of the
        tokens so far (then render ``prompt_ids`` of the whole conversation as a new sample).

        ``history`` ends with the assistant message whose tokens (``sampled_ids``) were just
        sampled. The text before the new messages is the template's rendering of the earlier
        conversation plus the sampled ids decoded with their special tokens; the returned ids
        are whatever the template renders after that: the end of the assistant turn if the
        model did not close it, the new messages, and the next generation prompt.
        """
        sampled_text = str(self.tokenizer.decode(sampled_ids, skip_special_tokens=False))
        before = self._render(history[:-1], tools, add_generation_prompt=True) + sampled_text
        after = self._render([*history, *new_messages], tools, add_generation_prompt=True)
        if not after.startswith(before):
            return None
        return self.tokenizer.encode(after[len(before) :], add_special_tokens=False)

    def with_tool_instructions(
        self, messages: Messages, tools: Tools, instructions: str | None = None
    ) -> Messages:
        """``messages`` with the tools described in the system message, when the template
        ignores ``tools=``; otherwise ``messages`` unchanged (also without tools, or when a
        message already holds the description: an env that writes it itself).

        ``instructions`` is the env's text describing the tools and its call syntax
        (``info["tool_instructions"]``); without it the tools are described in the Hermes
        ``<tool_call>`` format, palaestra's default. The text is appended to the first
        message if it is a system message, else it becomes a new system message.
        """
        if not tools:
            return list(messages)
        text = instructions or HermesFormat().instructions(tools)
        described = any(text in m.get("content", "") for m in messages)
        if described or self.renders_tools(messages, tools):
            return list(messages)
        if not self._told_tool_fallback:
            self._told_tool_fallback = True
            logger.warning(
                "the chat template ignores tools=; palaestra describes the tools and the call "
                "syntax in the system message instead"
            )
        if messages and messages[0]["role"] == "system":
            system = messages[0].copy()
            system["content"] = f"{system.get('content', '')}\n\n{text}"
            return [system, *messages[1:]]
        return [Message(role="system", content=text), *messages]

    def renders_tools(self, messages: Messages, tools: Tools) -> bool:
        """Whether the template renders ``messages`` differently with ``tools`` than without."""
        with_tools = self._render(messages, tools, add_generation_prompt=True)
        return with_tools != self._render(messages, None, add_generation_prompt=True)

    def decode(self, token_ids: list[int]) -> str:
        """The text of sampled ids with special tokens removed (what the env receives)."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _render(self, messages: Messages, tools: Tools, *, add_generation_prompt: bool) -> str:
        conversation: list[dict[str, Any]] = [dict(m) for m in messages]  # plain dicts for jinja
        text = self.tokenizer.apply_chat_template(
            conversation,
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        return str(text)
