"""read_jsonl: objects with their line numbers, gzip, and errors that name file:line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from palaestra.envs.errors import TaskSourceError
from palaestra.envs.jsonl import read_jsonl


def test_objects_come_with_their_line_numbers_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": 2}\n', encoding="utf-8")

    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"b": 2})]


def test_lines_end_at_newline_only(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"  # str.splitlines() would cut line 1 in four
    path.write_bytes('{"a": "w\u2028x\u2029y\x85z"}\r\n{"b": 2}\n'.encode())

    assert read_jsonl(path) == [(1, {"a": "w\u2028x\u2029y\x85z"}), (2, {"b": 2})]


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


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            '{"a": "caf\xe9"}'.encode("latin-1"),
            r"d.jsonl:2: not UTF-8 text \(byte 11 of the line is 0xe9\)",
        ),
        (b"\x89PNG\r\n\x1a\n\x00\x00", r"d.jsonl:2: not UTF-8 text \(byte 1 of the line is 0x89\)"),
    ],
)
def test_bytes_that_are_not_utf8_name_file_and_line(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n' + data + b"\n")

    with pytest.raises(TaskSourceError, match=message):
        read_jsonl(path)


def test_a_gz_file_that_is_not_gzip_data_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:-20])  # cut short

    with pytest.raises(TaskSourceError, match=r"d.jsonl.gz: not a readable gzip file"):
        read_jsonl(path)


def test_a_missing_file_is_named_as_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(TaskSourceError, match=r"^dataset .*missing.jsonl does not exist"):
        read_jsonl(tmp_path / "missing.jsonl", what="dataset")
