"""``read_jsonl``: the one JSON-lines reader behind every data file palaestra reads.

Task files, search questions and corpora, BFCL's and HumanEval's shipped data, and the
trainer's datasets are all JSON lines: one JSON object a line, blank lines skipped. The
reader returns each object with its line number, so the caller can name ``file:line`` when
a field is wrong; the reader itself refuses what is not JSON lines, with ``TaskSourceError``
naming ``file:line`` and the problem. A ``.gz`` file is read decompressed.

What it does not do: check what an object holds (the caller knows its fields), refuse an
empty file (an empty dataset is an error for some callers, not for others), or stream: the
whole file is read at once.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import IO, Any

from palaestra.envs.errors import TaskSourceError


def read_jsonl(
    path: str | Path, *, what: str = "file", example: str | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of ``path``, numbered from 1.

    Args:
        path: the file; a name ending in ``.gz`` is read with gzip.
        what: what the file is, for the missing-file message (``"task file"``, ...).
        example: one good line, shown in the message about a bad one.

    Raises ``TaskSourceError`` when the file is missing, or names ``file:line`` when a line
    is not valid JSON or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskSourceError(f"{what} {path} does not exist or is not a file.")
    how = f"Each line must be one JSON object{f', e.g. {example}' if example else ''}."
    rows: list[tuple[int, dict[str, Any]]] = []
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
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


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")
