"""read_jsonl: objects with their line numbers, gzip, and errors that name file:line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from palaestra.envs.errors import TaskSourceError
from palaestra.envs.jsonl import read_jsonl


def test_objects_come_with_their_line_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"  # a raw U+2028 inside a string does not end the line
    path.write_text('{"a": 1}\n\n  \n{"b": "x\u2028y"}\n', encoding="utf-8")

    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"b": "x\u2028y"})]


def test_a_gz_file_is_read_decompressed(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.write('{"a": 1}\n{"a": 2}\n')

    assert read_jsonl(path) == [(1, {"a": 1}), (2, {"a": 2})]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"d.jsonl:2: not valid JSON \(Expecting property name .* at column 2\)"),
        ("[1, 2]", r"d.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_a_bad_line_names_file_line_and_problem(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n' + line + "\n")

    with pytest.raises(TaskSourceError, match=message) as caught:
        read_jsonl(path, example='{"a": 1}')
    assert str(caught.value).endswith('Each line must be one JSON object, e.g. {"a": 1}.')


def test_a_missing_file_is_named_as_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(TaskSourceError, match=r"^dataset .*missing.jsonl does not exist"):
        read_jsonl(tmp_path / "missing.jsonl", what="dataset")
