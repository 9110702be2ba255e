"""Datasets: JSON lines to chat-template tokens with assistant-only loss masks."""

from __future__ import annotations

import json

import pytest

from palaestra.models import load_tokenizer
from palaestra.trainer.data import (
    ChatEncoder,
    LabelledAnswer,
    PreferencePair,
    batch_indices,
    held_out,
    labelled,
    read_preferences,
    read_sft,
    token_batch,
)
from palaestra.trainer.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "\\boxed{4}"},
    {"role": "user", "content": "and 3 + 3?"},
    {"role": "assistant", "content": "\\boxed{6}"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random")


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_masks_cover_exactly_the_assistant_turns_and_their_end_token(tokenizer):
    encoded = ChatEncoder(tokenizer, 512).encode(CHAT)
    trained = [i for i, m in zip(encoded.ids, encoded.mask, strict=True) if m]
    assert tokenizer.decode(trained) == "\\boxed{4}<|im_end|>\\boxed{6}<|im_end|>"
    # the ids are the template's rendering of the conversation, token for token
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(encoded.ids) == whole.removesuffix("\n")
    # train_from: the first exchange is prompt only
    later = ChatEncoder(tokenizer, 512).encode(CHAT, train_from=3)
    trained = [i for i, m in zip(later.ids, later.mask, strict=True) if m]
    assert tokenizer.decode(trained) == "\\boxed{6}<|im_end|>"


def test_the_answer_is_what_the_model_generates_after_the_rendered_prompt(tokenizer):
    from palaestra.agent.render import ChatRenderer

    encoded = ChatEncoder(tokenizer, 512).encode(CHAT[:3], train_from=2)
    prompt = ChatRenderer(tokenizer).prompt_ids(CHAT[:2])
    assert encoded.ids[: len(prompt)] == prompt and not any(encoded.mask[: len(prompt)])
    assert all(encoded.mask[len(prompt) :])


def test_long_conversations_are_cut_from_the_end(tokenizer):
    encoded = ChatEncoder(tokenizer, 20).encode(CHAT)
    assert encoded.truncated and len(encoded.ids) == len(encoded.mask) == 20


def test_a_cut_conversation_keeps_the_ids_and_mask_of_the_whole_one(tokenizer):
    words = " ".join(f"word{n}" for n in range(3000))  # long enough for a text to be cut
    chat = [*CHAT[:3], {"role": "user", "content": words}, {"role": "assistant", "content": words}]
    whole = ChatEncoder(tokenizer, 10**9).encode(chat, train_from=3)
    assert not whole.truncated
    length, answer = len(whole.ids), whole.mask.index(1)  # where the long answer starts
    for max_length in (1, 20, 300, answer, answer + 50, length - 1, length, length + 1):
        encoded = ChatEncoder(tokenizer, max_length).encode(chat, train_from=3)
        assert encoded.ids == whole.ids[:max_length]
        assert encoded.mask == whole.mask[:max_length]
        assert encoded.truncated == (max_length < length)


def test_a_huge_message_is_not_tokenised_whole(tokenizer, monkeypatch):
    megabytes = " ".join(f"word{n}" for n in range(400_000))  # 4.4 MB
    chat = [{"role": "user", "content": megabytes}, {"role": "assistant", "content": "ok"}]
    lengths = []
    encode = tokenizer.encode

    def noting_lengths(text, **kwargs):
        lengths.append(len(text))
        return encode(text, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", noting_lengths)
    encoded = ChatEncoder(tokenizer, 64).encode(chat)

    assert encoded.truncated and len(encoded.ids) == len(encoded.mask) == 64
    assert max(lengths) < 100_000
    shorter = [{"role": "user", "content": megabytes[:100_000]}, chat[1]]
    assert encoded.ids == ChatEncoder(tokenizer, 10**9).encode(shorter).ids[:64]


def test_sft_formats_and_their_errors(tmp_path):
    path = write(
        tmp_path,
        [{"messages": CHAT}, {"prompt": "hi", "completion": "hello"}],
    )
    chat, pair = read_sft(path)
    assert chat.train_from == 0 and pair.train_from == 1
    assert pair.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    bad = {
        "{not json": r"d.jsonl:1: not valid JSON",
        json.dumps({"text": "x"}): r'd.jsonl:1: an SFT line needs "messages"',
        json.dumps({"messages": [{"role": "user", "content": "x"}]}): "no assistant message",
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}): r"messages\[0\]: role",
        json.dumps({"prompt": "x", "completion": " "}): "completion is empty",
    }
    for line, message in bad.items():
        with pytest.raises(DataError, match=message):
            read_sft(write(tmp_path, [line]))
    with pytest.raises(DataError, match="does not exist"):
        read_sft(tmp_path / "missing.jsonl")


def test_preference_formats_and_kto_labels(tmp_path):
    path = write(
        tmp_path,
        [
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            {"prompt": [{"role": "user", "content": "q2"}], "completion": "meh", "label": False},
        ],
    )
    pair, answer = read_preferences(path)
    assert isinstance(pair, PreferencePair) and isinstance(answer, LabelledAnswer)
    assert [a.desirable for a in labelled([pair, answer])] == [True, False, False]
    with pytest.raises(DataError, match=r'd\.jsonl:1: "label" must be true or false'):
        read_preferences(write(tmp_path, [{"prompt": "q", "completion": "a", "label": "yes"}]))
    with pytest.raises(DataError, match='needs "chosen" and "rejected"'):
        read_preferences(write(tmp_path, [{"prompt": "q", "chosen": "a"}]))


def test_held_out_split_and_cycling_batches(tmp_path):
    train, held = held_out(list(range(10)), 3, seed=0, path="d")
    assert len(held) == 3 and sorted(train + held) == list(range(10))
    assert held_out(list(range(10)), 3, seed=0, path="d") == (train, held)  # seeded
    with pytest.raises(DataError, match=r"lower data\.eval_size"):
        held_out(list(range(3)), 3, seed=0, path="d")
    batches = batch_indices(5, 3, seed=0)
    first_pass = next(batches) + next(batches)[:2]
    assert sorted(first_pass) == list(range(5))  # every example once per pass


def test_token_batch_pads_and_masks(tokenizer):
    encoder = ChatEncoder(tokenizer, 512)
    rows = [encoder.encode(CHAT), encoder.encode(CHAT[:3])]
    batch = token_batch(rows, pad_id=tokenizer.pad_token_id)
    assert batch.input_ids_BT.shape == (2, len(rows[0].ids))
    assert batch.attention_mask_BT[1].sum() == len(rows[1].ids)
    assert batch.loss_mask_BT[1, len(rows[1].ids) :].sum() == 0
    assert batch.num_loss_tokens == sum(rows[0].mask) + sum(rows[1].mask)
    # a dataset batch carries no behaviour log-probs, advantages or labels
    assert batch.old_logprobs_BT is None and batch.advantages_BT is None
    assert batch.labels_B is None and batch.episode_B is None
