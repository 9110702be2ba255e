"""Task sources: where question/answer pairs for single-turn envs come from.

A task source is a read-only sequence of ``Task`` records for one split, ``"train"`` or
``"test"``. The two splits of a source never share a question, so a held-out score is
held out. Two sources ship here:

- ``ReasoningGymSource``: procedural tasks from ``reasoning_gym`` (arithmetic, chain sums,
  GSM-symbolic, ...), generated lazily and deterministically from a seed.
- ``JsonlSource``: a JSON-lines file of ``{"question", "answer"}`` records, split by a
  stable hash of the question.

``parse_source`` turns a config spec (``"reasoning_gym:chain_sum"``,
``"jsonl:data/qa.jsonl"``) into a source.

What this module does not do: prompt formatting or answer checking (see ``math.py`` and
``verify.py``), and it downloads nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast, runtime_checkable

import numpy as np

from palaestra.envs.errors import EnvConfigError, TaskSourceError
from palaestra.envs.jsonl import read_jsonl

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")


@dataclass(frozen=True)
class Task:
    """One question with its gold answer."""

    task_id: str
    """Stable id, unique within its source and split; rollouts group samples by it."""
    question: str
    """The question text shown to the model (before any prompt template)."""
    answer: str
    """The gold answer, as text (e.g. ``"-4"``, ``"\\frac{1}{2}"``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Whatever else the source knows about the task (difficulty, generator parameters)."""


@runtime_checkable
class TaskSource(Protocol):
    """A read-only, indexable sequence of tasks for one split."""

    split: Split
    """Which split this source serves: ``"train"`` or ``"test"``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Task: ...


def check_split(split: str) -> Split:
    """Return ``split`` if it is ``"train"`` or ``"test"``, else raise ``TaskSourceError``."""
    if split not in SPLITS:
        raise TaskSourceError(f"split must be 'train' or 'test', got {split!r}.")
    return cast(Split, split)


def pick_task_index(options: Mapping[str, Any], rng: np.random.Generator, num_tasks: int) -> int:
    """``options["task_index"]`` checked against ``num_tasks``, or a draw from ``rng``: how
    every env's ``reset`` picks its task."""
    if "task_index" not in options:
        return int(rng.integers(num_tasks))
    index = options["task_index"]
    if not isinstance(index, numbers.Integral) or not 0 <= int(index) < num_tasks:
        raise EnvConfigError(
            f"options['task_index'] must be an integer in [0, {num_tasks}), got {index!r}."
        )
    return int(index)


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same on every run and machine (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def check_index(index: int, size: int, source: object) -> None:
    if not 0 <= index < size:
        raise IndexError(f"task index {index} is out of range for {source} ({size} tasks).")


class ReasoningGymSource:
    """Procedural tasks from ``reasoning_gym.create_dataset(name, seed=..., size=..., **config)``.

    The train and test splits are generated from two seeds derived from ``seed`` (by a
    stable hash, so they are far apart and the same on every run). The test split is the
    first ``test_size`` tasks of its seed. Train tasks whose question text appears in that
    test set are dropped: train index ``i`` then takes the task at index ``i`` of a further
    derived seed, and so on, so the train split never overlaps the test split and every
    index still resolves deterministically. A test source of any ``size <= test_size`` is
    disjoint from a train source built with the same ``name``, ``seed``, ``config`` and
    ``test_size``.

    Construction generates only the test questions (``test_size`` items); train tasks are
    generated on ``__getitem__``, so a 10,000-task train split costs nothing up front.
    """

    MAX_REDRAWS = 64
    """How many further seeds a train index tries before giving up on finding a question
    outside the test split (only reached when the generator's task space is tiny)."""

    def __init__(
        self,
        name: str,
        split: Split = "train",
        size: int | None = None,
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        *,
        test_size: int = 200,
    ) -> None:
        """Args:
        name: a ``reasoning_gym`` dataset name, e.g. ``"chain_sum"``.
        split: ``"train"`` or ``"test"``.
        size: number of tasks in this split; defaults to 10,000 for train and
            ``test_size`` for test.
        seed: the one seed both splits derive from.
        config: keyword arguments for the dataset's config (e.g. ``{"min_terms": 2}``).
        test_size: size of the held-out split that train excludes.
        """
        self.name = name
        self.split = check_split(split)
        self.seed = seed
        self.config = dict(config or {})
        self.test_size = test_size
        self.size = resolve_size(size, self.split, test_size)
        self._datasets: dict[int, Any] = {}
        held_out = self._dataset("test", 0)
        if self.split == "test":
            self._test_tasks = [self._task_from(held_out, i) for i in range(self.size)]
        else:
            self._test_questions = frozenset(held_out[i]["question"] for i in range(test_size))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Task:
        check_index(index, self.size, self)
        if self.split == "test":
            return self._test_tasks[index]
        for redraw in range(self.MAX_REDRAWS):
            task = self._task_from(self._dataset("train", redraw), index)
            if task.question not in self._test_questions:
                return task
        raise TaskSourceError(
            f"{self}: train task {index} kept drawing questions from the test split "
            f"({self.MAX_REDRAWS} tries). The generator's task space is too small for a disjoint "
            "split: lower test_size or widen the config (more terms, more digits)."
        )

    def __repr__(self) -> str:
        return f"ReasoningGymSource({self.name!r}, split={self.split!r}, size={self.size}, seed={self.seed})"

    def _dataset(self, split: Split, redraw: int) -> Any:
        key = -1 if split == "test" else redraw
        if key not in self._datasets:
            derived_seed = stable_hash(f"palaestra:{self.name}:{self.seed}:{split}:{redraw}") >> 33
            size = self.test_size if split == "test" else self.size
            self._datasets[key] = _create_dataset(self.name, derived_seed, size, self.config)
        return self._datasets[key]

    def _task_from(self, dataset: Any, index: int) -> Task:
        entry = dataset[index]
        return Task(
            task_id=f"{self.name}/seed{self.seed}/{self.split}/{index}",
            question=entry["question"],
            answer=str(entry["answer"]),
            metadata=dict(entry.get("metadata", {})),
        )


def resolve_size(size: int | None, split: Split, test_size: int) -> int:
    if test_size < 1:
        raise TaskSourceError(f"test_size must be at least 1, got {test_size}.")
    if size is None:
        return 10_000 if split == "train" else test_size
    if size < 1:
        raise TaskSourceError(f"size must be at least 1, got {size}.")
    if split == "test" and size > test_size:
        raise TaskSourceError(
            f"a test split of size {size} is larger than test_size={test_size}, the number of "
            f"tasks the train split holds out. Pass test_size={size} to both the train and the "
            "test source."
        )
    return size


def _create_dataset(name: str, seed: int, size: int, config: dict[str, Any]) -> Any:
    import reasoning_gym  # imported here: it takes most of a second to load
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f"Did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise TaskSourceError(
            f"reasoning_gym has no dataset {name!r}. {hint}"
            "reasoning_gym.factory.DATASETS lists all of them."
        )
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError) as error:
        raise TaskSourceError(
            f"reasoning_gym rejected the config {config!r} for {name!r}: {error}. See the "
            f"fields of its config class in reasoning_gym for the allowed keys and ranges."
        ) from error


class JsonlSource:
    """Tasks from a JSON-lines file, one ``{"question": ..., "answer": ...}`` object a line.

    An optional ``"id"`` key names the task (default ``"<file name>:<line>"``); every other
    key goes to ``Task.metadata``. Blank lines are skipped. A line lands in the test split
    when a stable hash of ``seed`` and its question text falls under ``test_fraction``, so
    the split is the same on every run, and a question repeated in the file always lands
    in the same split: the splits never share a question.
    """

    def __init__(
        self,
        path: str | Path,
        split: Split = "train",
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        """Args:
        path: the ``.jsonl`` file.
        split: ``"train"`` or ``"test"``.
        test_fraction: the share of questions held out for test, strictly between 0 and 1.
        seed: changes which questions are held out.
        """
        if not 0.0 < test_fraction < 1.0:
            raise TaskSourceError(
                f"test_fraction must be strictly between 0 and 1, got {test_fraction}."
            )
        self.path = Path(path)
        self.split = check_split(split)
        self.test_fraction = test_fraction
        self.seed = seed
        all_tasks = read_jsonl_tasks(self.path)
        self._tasks = [task for task in all_tasks if self._split_of(task.question) == self.split]
        if not self._tasks:
            raise TaskSourceError(
                f"{self.path}: the {self.split!r} split is empty ({len(all_tasks)} tasks in the "
                f"file, test_fraction={test_fraction}). Add tasks or change test_fraction."
            )

    def __len__(self) -> int:
        return len(self._tasks)

    def __getitem__(self, index: int) -> Task:
        check_index(index, len(self._tasks), self)
        return self._tasks[index]

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, split={self.split!r}, size={len(self)})"

    def _split_of(self, question: str) -> Split:
        bucket = stable_hash(f"{self.seed}\x00{question}") / 2**64
        return "test" if bucket < self.test_fraction else "train"


def read_jsonl_tasks(path: Path) -> list[Task]:
    """Read every task in a JSON-lines file; a bad line raises ``TaskSourceError`` (file:line)."""
    tasks: list[Task] = []
    seen_ids: dict[str, int] = {}
    for line_number, record in read_jsonl(path, what="task file", example=_EXAMPLE_LINE):
        task = _task_from_record(record, f"{path}:{line_number}", f"{path.name}:{line_number}")
        if task.task_id in seen_ids:
            raise TaskSourceError(
                f"{path}:{line_number}: id {task.task_id!r} was already used on line "
                f"{seen_ids[task.task_id]}. Give every task a unique id."
            )
        seen_ids[task.task_id] = line_number
        tasks.append(task)
    return tasks


_EXAMPLE_LINE = '{"question": "What is 2 + 3?", "answer": "5"}'


def _task_from_record(record: dict[str, Any], where: str, default_id: str) -> Task:
    question = record.pop("question", None)
    if not isinstance(question, str) or not question.strip():
        raise TaskSourceError(f"{where}: 'question' must be a non-empty string, got {question!r}.")
    answer = record.pop("answer", None)
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TaskSourceError(
            f"{where}: 'answer' must be a string or a number, got {answer!r}. "
            'Write the gold answer as text, e.g. "answer": "\\\\frac{1}{2}".'
        )
    task_id = record.pop("id", default_id)
    if not isinstance(task_id, (str, int)) or isinstance(task_id, bool):
        raise TaskSourceError(f"{where}: 'id' must be a string or an integer, got {task_id!r}.")
    return Task(task_id=str(task_id), question=question, answer=str(answer), metadata=record)


SOURCE_KINDS: dict[str, frozenset[str]] = {
    "reasoning_gym": frozenset({"size", "test_size", "config"}),
    "jsonl": frozenset({"test_fraction"}),
}
"""Source kinds ``parse_source`` understands, with the options each accepts."""


def parse_source(
    spec: str | Mapping[str, Any], split: Split = "train", seed: int = 0, **options: Any
) -> TaskSource:
    """Build a task source from a config spec.

    ``spec`` is ``"kind:target"`` — ``"reasoning_gym:chain_sum"`` or
    ``"jsonl:path/to/tasks.jsonl"`` — or a mapping ``{"source": "kind:target", **options}``.
    ``options`` (from the mapping or the keywords; keywords win) go to the source's
    constructor: ``size``, ``test_size``, ``config`` for reasoning_gym, ``test_fraction``
    for jsonl.
    """
    if isinstance(spec, Mapping):
        mapping = dict(spec)
        if "source" not in mapping:
            raise TaskSourceError(
                f"a source mapping needs a 'source' key such as 'reasoning_gym:chain_sum'; "
                f"got keys {sorted(mapping)}."
            )
        spec = mapping.pop("source")
        options = {**mapping, **options}
    kind, target = _split_spec(spec)
    unknown = sorted(set(options) - SOURCE_KINDS[kind])
    if unknown:
        raise TaskSourceError(
            f"{kind} sources take no option(s) {unknown}; allowed: {sorted(SOURCE_KINDS[kind])}."
        )
    if kind == "jsonl":
        return JsonlSource(target, split=split, seed=seed, **options)
    return ReasoningGymSource(target, split=split, seed=seed, **options)


def _split_spec(spec: object) -> tuple[str, str]:
    allowed = ", ".join(f"'{kind}:...'" for kind in SOURCE_KINDS)
    if not isinstance(spec, str) or ":" not in spec:
        raise TaskSourceError(
            f"a source spec looks like 'kind:target' with kind one of {allowed}; got {spec!r}."
        )
    kind, target = spec.split(":", 1)
    if kind not in SOURCE_KINDS:
        raise TaskSourceError(
            f"unknown source kind {kind!r} in {spec!r}; allowed kinds: {allowed}."
        )
    if not target:
        raise TaskSourceError(f"the source spec {spec!r} names no dataset or file after the colon.")
    return kind, target
