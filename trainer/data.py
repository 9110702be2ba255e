"""Datasets for the SFT, DPO-family and reward-model stages: JSON lines to token rows.

Formats, one JSON object a line (a message is ``{"role": ..., "content": ...}``; a string
prompt is one user message, a string answer one assistant message):

- SFT: ``{"messages": [...]}`` (the loss is on every assistant message) or
  ``{"prompt": ..., "completion": ...}`` (the loss is on the completion).
- Preferences: ``{"prompt": ..., "chosen": ..., "rejected": ...}``.
- Unpaired (KTO): ``{"prompt": ..., "completion": ..., "label": true | false}``; a paired
  file serves KTO too, each pair giving one desirable and one undesirable answer.

Tokens come from the model's chat template, rendered the way rollouts render them: each
prompt part is the template's text up to the assistant's generation prompt, and each
assistant message is the text the template puts after it, up to and including the token
that ends the turn (``<|im_end|>`` for ChatML), which the model must learn to emit. The
loss mask is 1 exactly on those assistant tokens. A template that renders an earlier part
of the conversation differently once later messages are added cannot be trained on this
way and raises ``DataError``.

What this module does not do: parse JSON lines (the shared ``envs.jsonl.read_jsonl``; its
errors become ``DataError`` here) or compute losses and log-probs (``losses``,
``learner``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from palaestra.envs.core import Messages
from palaestra.envs.errors import TaskSourceError
from palaestra.envs.jsonl import read_jsonl
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from palaestra.config import DataConfig

ROLES = ("system", "user", "assistant", "tool")
Example = TypeVar("Example")


@dataclass(frozen=True)
class ChatExample:
    """A conversation trained on from message ``train_from`` on (its assistant messages)."""

    messages: Messages
    """The whole conversation."""
    train_from: int = 0
    """Index of the first message whose assistant turns carry loss (earlier: the prompt)."""


@dataclass(frozen=True)
class PreferencePair:
    """Two answers to one prompt, the first preferred."""

    prompt: Messages
    chosen: Messages
    """The preferred answer's messages (usually one assistant message)."""
    rejected: Messages


@dataclass(frozen=True)
class LabelledAnswer:
    """One answer to a prompt, marked desirable or not (KTO)."""

    prompt: Messages
    completion: Messages
    desirable: bool


@dataclass(frozen=True)
class Encoded:
    """One tokenised conversation."""

    ids: list[int]
    mask: list[int]
    """1 on trained (assistant) tokens."""
    truncated: bool
    """Whether the conversation was cut to ``max_length``."""


def _read_dataset(path: str | Path, example: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line (``envs.jsonl.read_jsonl``);
    ``DataError`` names a missing or empty file, or the bad line with ``example``."""
    try:
        rows = read_jsonl(path, what="dataset", example=example)
    except TaskSourceError as exc:
        raise DataError(str(exc)) from None
    if not rows:
        raise DataError(f"dataset {path} is empty")
    return rows


def read_sft(path: str | Path) -> list[ChatExample]:
    """SFT examples: ``{"messages"}`` or ``{"prompt", "completion"}`` per line."""
    examples = []
    for number, row in _read_dataset(path, '{"prompt": "...", "completion": "..."}'):
        where = f"{path}:{number}"
        if "messages" in row:
            messages = _messages(row["messages"], f"{where}: messages", "user")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: messages has no assistant message to train on")
            examples.append(ChatExample(messages))
        elif "prompt" in row and "completion" in row:
            prompt = _messages(row["prompt"], f"{where}: prompt", "user")
            answer = _messages(row["completion"], f"{where}: completion", "assistant")
            examples.append(ChatExample([*prompt, *answer], train_from=len(prompt)))
        else:
            raise DataError(
                f'{where}: an SFT line needs "messages", or "prompt" and "completion"; '
                f"found keys {sorted(row)}"
            )
    return examples


def read_preferences(path: str | Path) -> list[PreferencePair | LabelledAnswer]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` or labelled answers
    ``{"prompt", "completion", "label"}`` (KTO), one per line."""
    examples: list[PreferencePair | LabelledAnswer] = []
    for number, row in _read_dataset(path, '{"prompt": "...", "chosen": "...", "rejected": "..."}'):
        where = f"{path}:{number}"
        if "prompt" not in row:
            raise DataError(f'{where}: missing "prompt"')
        prompt = _messages(row["prompt"], f"{where}: prompt", "user")
        if "chosen" in row and "rejected" in row:
            chosen = _messages(row["chosen"], f"{where}: chosen", "assistant")
            rejected = _messages(row["rejected"], f"{where}: rejected", "assistant")
            examples.append(PreferencePair(prompt, chosen, rejected))
        elif "completion" in row and "label" in row:
            if not isinstance(row["label"], bool):
                raise DataError(f'{where}: "label" must be true or false, got {row["label"]!r}')
            answer = _messages(row["completion"], f"{where}: completion", "assistant")
            examples.append(LabelledAnswer(prompt, answer, row["label"]))
        else:
            raise DataError(
                f'{where}: a preference line needs "chosen" and "rejected" (pairs) or '
                f'"completion" and "label" (KTO); found keys {sorted(row)}'
            )
    return examples


def pairs_only(
    examples: Sequence[PreferencePair | LabelledAnswer], path: Any
) -> list[PreferencePair]:
    """The examples as pairs; ``DataError`` if the file holds unpaired answers."""
    if not all(isinstance(e, PreferencePair) for e in examples):
        raise DataError(
            f"{path} holds unpaired answers (prompt, completion, label): only the KTO loss "
            'takes them; use dpo.loss: kto, or write "chosen" and "rejected" pairs'
        )
    return list(examples)  # type: ignore[arg-type]


def labelled(examples: Sequence[PreferencePair | LabelledAnswer]) -> list[LabelledAnswer]:
    """Examples as labelled answers (KTO): a pair gives a desirable and an undesirable one."""
    out = []
    for e in examples:
        if isinstance(e, PreferencePair):
            out += [
                LabelledAnswer(e.prompt, e.chosen, True),
                LabelledAnswer(e.prompt, e.rejected, False),
            ]
        else:
            out.append(e)
    return out


def split_dataset(
    data: DataConfig, seed: int, read: Callable[[Path], list[Example]]
) -> tuple[list[Example], list[Example]]:
    """``(train, held out)`` examples of ``data.path`` as ``read`` reads them: held out are
    those of ``data.eval_path`` if given, else ``data.eval_size`` rows of ``data.path``
    (``held_out``), else none."""
    examples = read(data.path)  # type: ignore[arg-type]  # DatasetStageConfig requires it
    if data.eval_path is not None:
        return examples, read(data.eval_path)
    if data.eval_size:
        return held_out(examples, data.eval_size, seed, data.path)
    return examples, []


def held_out(rows: list[Any], eval_size: int, seed: int, path: Any) -> tuple[list[Any], list[Any]]:
    """``(train, eval)``: ``eval_size`` rows drawn at random (seeded) for evaluation."""
    if eval_size >= len(rows):
        raise DataError(
            f"{path} has {len(rows)} examples; data.eval_size={eval_size} would leave none to "
            "train on: lower data.eval_size or give data.eval_path"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:eval_size])
    return [r for i, r in enumerate(rows) if i not in chosen], [rows[i] for i in sorted(chosen)]


def batch_indices(n: int, batch_size: int, seed: int, *, skip: int = 0) -> Iterator[list[int]]:
    """Endless batches of indices into ``n`` examples: each pass is a fresh seeded shuffle,
    and a batch that runs past the end of a pass continues into the next. The batches are a
    function of ``(n, batch_size, seed)`` alone, so a resumed run continues its sequence by
    skipping the ``skip`` batches it already trained on."""
    rng = random.Random(seed)
    order: list[int] = []
    drawn = 0
    while True:
        while len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        if drawn >= skip:
            yield order[:batch_size]
        drawn += 1
        order = order[batch_size:]


_IDS_AFTER_KEPT = 1024
"""How many ids of a cut text follow the ones kept. Which id a tokenizer picks depends on
the text right after it (the rest of its word, number or run of spaces), not on text a
thousand ids on, so the kept ids are those of the whole text. (SmolLM2's tokenizer, cut
inside runs of one letter, of spaces or of random characters, changes at most 3 ids.)"""

_CHARS_PER_ID = 8
"""Characters a text is first cut to per id needed; most text needs about 4, and the cut
doubles until it holds enough ids."""


class ChatEncoder:
    """Tokenises conversations with a chat template and assistant-only loss masks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.end_text = str(tokenizer.eos_token or "")

    def encode(self, messages: Messages, train_from: int = 0) -> Encoded:
        """Ids and mask of ``messages``: assistant messages at index ``>= train_from`` are
        trained on, through their end-of-turn token. The conversation ends after its last
        trained message; it is cut from the end to ``max_length`` tokens. The work stops
        once ``max_length`` is passed: later messages are not rendered, and a long text is
        tokenised from a cut beginning (``_token_ids``), so a 50 MB conversation costs
        little more than a short one."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ids: list[int] = []
        mask: list[int] = []
        rendered = ""
        for i, message in enumerate(messages[: last + 1]):
            if len(ids) > self.max_length:
                break  # the rest would be cut off
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], generation_prompt=True)
            full = self._render(messages[: i + 1], generation_prompt=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise DataError(
                    "the chat template renders earlier turns differently once later ones are "
                    "added (it rewrites history), so assistant tokens cannot be masked exactly; "
                    "train on one assistant turn per example"
                )
            answer = full[len(prompt) :]
            cut = (
                answer.find(self.end_text) + len(self.end_text)
                if self.end_text in answer
                else len(answer)
            )
            trained = 1 if i >= train_from else 0
            for text, flag in ((prompt[len(rendered) :], 0), (answer[:cut], trained)):
                if len(ids) <= self.max_length:
                    part = self._token_ids(text, wanted=self.max_length + 1 - len(ids))
                    ids += part
                    mask += [flag] * len(part)
            rendered = prompt + answer[:cut]
        truncated = len(ids) > self.max_length
        return Encoded(ids[: self.max_length], mask[: self.max_length], truncated)

    def _token_ids(self, text: str, wanted: int) -> list[int]:
        """The ids of ``text``, or, when it holds more than ``wanted`` (>= 1), its first
        ``wanted``: taken from a beginning of it long enough to hold ``_IDS_AFTER_KEPT`` more,
        so a 50 MB message is not tokenised whole."""
        chars = (wanted + _IDS_AFTER_KEPT) * _CHARS_PER_ID
        while chars < len(text):
            ids = self.tokenizer.encode(text[:chars], add_special_tokens=False)
            if len(ids) >= wanted + _IDS_AFTER_KEPT:
                return ids[:wanted]
            chars *= 2
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: Messages, *, generation_prompt: bool) -> str:
        if not messages:
            return ""
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],  # type: ignore[arg-type]
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )
        return str(text)


def token_batch(rows: Sequence[Encoded], pad_id: int) -> TokenBatch:
    """Right-padded rows as a ``TokenBatch``: ids, attention and loss mask only."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for b, row in enumerate(rows):
        ids[b, : len(row.ids)] = torch.tensor(row.ids)
        attention[b, : len(row.ids)] = 1
        mask[b, : len(row.ids)] = torch.tensor(row.mask, dtype=torch.float32)
    mask[:, 0] = 0.0  # token 0 has no logits to be scored from
    return TokenBatch(ids, attention, mask)


def _messages(value: Any, where: str, default_role: str) -> Messages:
    """A string as one message of ``default_role``, or a checked list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where} is empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a string or a non-empty list of messages")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f'{where}[{k}] must be {{"role": ..., "content": "<text>"}}')
        if m.get("role") not in ROLES:
            raise DataError(f"{where}[{k}]: role must be one of {ROLES}, got {m.get('role')!r}")
    return value
