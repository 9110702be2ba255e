"""``read_jsonl``: the one JSON-lines reader behind every data file palaestra reads.

Task files, search questions and corpora, BFCL's and HumanEval's shipped data, and the
trainer's datasets are all JSON lines: one JSON object a line, blank lines skipped. The
reader returns each object with its line number, so the caller can name ``file:line`` when
a field is wrong; the reader itself refuses what is not JSON lines, with ``TaskSourceError``
naming ``file:line`` and the problem (bytes that are not UTF-8 text included). Lines end
at ``"\\n"`` only (``"\\r\\n"`` too, the ``"\\r"`` being JSON whitespace): a raw U+2028
inside a string, which ``str.splitlines()`` takes for a line end, stays in its line. A
``.gz`` file is read decompressed.

What it does not do: check what an object holds (the caller knows its fields), refuse an
empty file (an empty dataset is an error for some callers, not for others), or stream: the
whole file is read at once.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from palaestra.envs.errors import TaskSourceError


def read_jsonl(
    path: str | Path, *, what: str = "file", example: str | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of ``path``, numbered from 1.

    Args:
        path: the file; a name ending in ``.gz`` is read with gzip.
        what: what the file is, for the missing-file message (``"task file"``, ...).
        example: one good line, shown in the message about a bad one.

    Raises ``TaskSourceError`` when the file is missing or a ``.gz`` file is not gzip data,
    or names ``file:line`` when a line is not UTF-8 text, not valid JSON or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskSourceError(f"{what} {path} does not exist or is not a file.")
    how = f"Each line must be one JSON object{f', e.g. {example}' if example else ''}."
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(_byte_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TaskSourceError(
                f"{path}:{number}: not UTF-8 text (byte {error.start + 1} of the line is "
                f"{raw[error.start]:#04x}). {how}"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskSourceError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}). {how}"
            ) from None
        if not isinstance(row, dict):
            raise TaskSourceError(
                f"{path}:{number}: expected a JSON object, got {type(row).__name__}. {how}"
            )
        rows.append((number, row))
    return rows


def _byte_lines(path: Path) -> Iterator[bytes]:
    """The file's lines, split at ``b"\\n"`` only, decompressed if the name ends in ``.gz``;
    ``TaskSourceError`` when such a file is not whole gzip data."""
    if path.suffix != ".gz":
        with path.open("rb") as file:
            yield from file
        return
    try:
        with gzip.open(path, "rb") as file:
            yield from file
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise TaskSourceError(f"{path}: not a readable gzip file ({error}).") from None
