"""Task sources: deterministic, and the train and test splits never share a question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palaestra.envs import JsonlSource, ReasoningGymSource, Task, TaskSourceError, parse_source
from palaestra.envs.registry import SMALL_ARITHMETIC
from palaestra.envs.tasks import TaskSource


def _questions(source: TaskSource) -> set[str]:
    return {source[i].question for i in range(len(source))}


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum", "gsm_symbolic"])
def test_reasoning_gym_train_and_test_never_overlap(name: str) -> None:
    config = SMALL_ARITHMETIC if name != "gsm_symbolic" else {}
    train = ReasoningGymSource(name, "train", size=3000, seed=7, config=config, test_size=200)
    test = ReasoningGymSource(name, "test", seed=7, config=config, test_size=200)

    assert len(train) == 3000 and len(test) == 200
    assert not _questions(train) & _questions(test)


def test_reasoning_gym_train_skips_questions_of_a_small_task_space() -> None:
    # 1-digit sums of two terms: about 200 distinct questions, so many train draws collide.
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    train = ReasoningGymSource("chain_sum", "train", size=500, config=config, test_size=60)
    test = ReasoningGymSource("chain_sum", "test", config=config, test_size=60)

    assert not _questions(train) & _questions(test)


def test_reasoning_gym_is_deterministic_per_seed() -> None:
    first = ReasoningGymSource("chain_sum", "train", size=50, seed=3)
    again = ReasoningGymSource("chain_sum", "train", size=50, seed=3)
    other = ReasoningGymSource("chain_sum", "train", size=50, seed=4)

    assert [first[i] for i in range(50)] == [again[i] for i in range(50)]
    assert _questions(first) != _questions(other)


def test_reasoning_gym_task_fields() -> None:
    task = ReasoningGymSource("basic_arithmetic", "test", size=5)[2]

    assert isinstance(task, Task)
    assert task.task_id == "basic_arithmetic/seed0/test/2"
    assert task.question and task.answer
    assert task.metadata["source_dataset"] == "basic_arithmetic"


def test_reasoning_gym_test_larger_than_held_out_set_is_refused() -> None:
    with pytest.raises(TaskSourceError, match="test_size=500"):
        ReasoningGymSource("chain_sum", "test", size=500, test_size=200)


def test_reasoning_gym_gives_up_when_no_disjoint_train_task_exists() -> None:
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    train = ReasoningGymSource("chain_sum", "train", size=10, config=config, test_size=3000)

    with pytest.raises(TaskSourceError, match="too small for a disjoint split"):
        train[0]


def test_reasoning_gym_bad_name_and_config_are_named() -> None:
    with pytest.raises(TaskSourceError, match="Did you mean 'chain_sum'"):
        ReasoningGymSource("chain_summ")
    with pytest.raises(TaskSourceError, match="bogus"):
        ReasoningGymSource("chain_sum", config={"bogus": 1})


def test_index_out_of_range_raises_index_error() -> None:
    source = ReasoningGymSource("chain_sum", "test", size=5)

    with pytest.raises(IndexError):
        source[5]
    assert len(list(source)) == 5  # iteration stops at the end


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def qa_file(tmp_path: Path) -> Path:
    records = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(300)]
    records += [{"question": "What is 0 + 0?", "answer": "0"}] * 3  # repeats of one question
    return _write_jsonl(tmp_path / "qa.jsonl", records)


def test_jsonl_split_is_disjoint_complete_and_stable(qa_file: Path) -> None:
    train = JsonlSource(qa_file, "train", test_fraction=0.2, seed=1)
    test = JsonlSource(qa_file, "test", test_fraction=0.2, seed=1)

    assert len(train) + len(test) == 303
    assert not _questions(train) & _questions(test)
    assert 30 < len(test) < 90  # about 20% of 300
    assert _questions(JsonlSource(qa_file, "test", test_fraction=0.2, seed=1)) == _questions(test)
    assert _questions(JsonlSource(qa_file, "test", test_fraction=0.2, seed=2)) != _questions(test)


def test_jsonl_ids_and_metadata(tmp_path: Path) -> None:
    records = [
        {"question": f"q{i}", "answer": i, "id": f"task-{i}", "level": 3} for i in range(40)
    ] + [{"question": "unnamed", "answer": "x"}]
    path = _write_jsonl(tmp_path / "named.jsonl", records)

    tasks = [*JsonlSource(path, "train"), *JsonlSource(path, "test")]

    named = {task.task_id: task for task in tasks}
    assert named["task-7"].answer == "7"
    assert named["task-7"].metadata == {"level": 3}
    assert "named.jsonl:41" in named


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"answer": "3"}', "'question' must be a non-empty string"),
        ('{"question": "2+1?"}', "'answer' must be a string or a number"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n\n' + line + "\n")

    with pytest.raises(TaskSourceError, match=message) as caught:
        JsonlSource(path)
    assert f"{path}:3" in str(caught.value)


def test_jsonl_duplicate_ids_are_refused(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "dup.jsonl", [{"question": "a", "answer": "1", "id": 1}] * 2)

    with pytest.raises(TaskSourceError, match="already used on line 1"):
        JsonlSource(path)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskSourceError, match="does not exist"):
        JsonlSource(tmp_path / "missing.jsonl")


def test_parse_source_specs(qa_file: Path) -> None:
    source = parse_source("reasoning_gym:chain_sum", split="test", seed=2, size=10)
    assert isinstance(source, ReasoningGymSource)
    assert (source.name, source.split, source.seed, len(source)) == ("chain_sum", "test", 2, 10)

    mapping = {"source": f"jsonl:{qa_file}", "test_fraction": 0.5}
    source = parse_source(mapping, split="train")
    assert isinstance(source, JsonlSource) and source.test_fraction == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("huggingface:gsm8k", "allowed kinds: 'reasoning_gym:...', 'jsonl:...'"),
        ("chain_sum", "looks like 'kind:target'"),
        ("jsonl:", "names no dataset or file"),
        ({"size": 3}, "needs a 'source' key"),
    ],
)
def test_parse_source_bad_specs(spec: object, message: str) -> None:
    with pytest.raises(TaskSourceError, match=message):
        parse_source(spec)


def test_parse_source_rejects_options_of_another_kind() -> None:
    with pytest.raises(TaskSourceError, match=r"jsonl sources take no option\(s\) \['size'\]"):
        parse_source("jsonl:x.jsonl", size=3)
