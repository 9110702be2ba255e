"""Chat rendering: messages to prompt token ids, with sampled tokens kept verbatim.

The renderer is the only place where text becomes tokens. It renders the opening messages
with the model's chat template (generation prompt included) and, in multi-turn episodes,
renders only the *new* messages that follow a sampled turn, appending their ids after the
sampled ids. Sampled ids are never decoded and re-encoded, so the tokens the trainer sees
are exactly the tokens the engine produced.

A continuation is derived from the template's text: the earlier conversation followed by
the sampled text must be a prefix of the conversation rendered with the new messages.
Templates that rewrite history break that property; ``continuation_ids`` then raises
``TemplateDriftError`` rather than train on tokens that were never sampled.

What this module does not do: tool-call parsing or tool schemas in prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from palaestra.agent.errors import TemplateDriftError
from palaestra.envs.core import Messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ChatRenderer:
    """Turns chat messages into token ids with a tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def prompt_ids(
        self, messages: Messages, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of ``messages`` followed by the assistant generation prompt."""
        text = self._render(messages, tools, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def continuation_ids(
        self,
        history: Messages,
        sampled_ids: list[int],
        new_messages: Messages,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Ids to append after a sampled turn so the model can answer ``new_messages``.

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
            raise TemplateDriftError(
                "the chat template does not render the conversation as an extension of the "
                "tokens already in the episode (it rewrites earlier turns or re-formats the "
                "sampled text), so the episode cannot continue as one token sequence"
            )
        return self.tokenizer.encode(after[len(before) :], add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        """The text of sampled ids with special tokens removed (what the env receives)."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _render(
        self, messages: Messages, tools: list[dict[str, Any]] | None, *, add_generation_prompt: bool
    ) -> str:
        conversation: list[dict[str, Any]] = [dict(m) for m in messages]  # plain dicts for jinja
        text = self.tokenizer.apply_chat_template(
            conversation,
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        return str(text)
