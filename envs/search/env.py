"""``SearchEnv`` (``palaestra/Search-v0``): answer questions by searching a corpus.

A multi-turn ``ToolEnv`` with one tool, ``search(query)``: the model searches (each result
a document id, title and text, clipped), reads, searches again, and finally answers
without a tool call. The answer is taken out of the reply (``AnswerExtraction``: the last
``\\boxed{}`` by default, or ``<answer>...</answer>``, or the whole reply), normalised
(lower case, no punctuation, articles or extra spaces) and compared with every gold
answer: the reward is ``(1 - f1_weight) * exact_match + f1_weight * f1``, and
``info["reward_components"]`` holds it (``correct``, as in every ``ToolEnv``) with its
parts ``exact_match`` and ``f1``.

Where the documents come from (at most one of these; by default the built-in generated
encyclopedia of ``seed``, indexed in this process):

- ``corpus="corpus.jsonl"``: a JSON-lines corpus, indexed in this process at start-up;
- ``index="DIR"``: an index built by ``palaestra search index``;
- ``retriever_url="http://host:port"``: a shared ``palaestra search serve`` server; a
  server that stays unreachable turns the episode into an infrastructure failure;
- ``retriever=...``: any ``Retriever`` object (from Python).

Questions come from ``questions="questions.jsonl"`` (``{"question", "answers": [...]}``
a line) or, by default, the built-in encyclopedia of ``seed`` (serve it with
``palaestra search generate`` then ``index``/``serve``). Questions are split into train
and test by a stable hash of their text (``test_fraction``); both splits search the same
corpus.

Scripted solver (``expert_action``, see ``envs/solver.py``) for the built-in questions: the
``EncyclopediaOracle`` searches for the question's subject, reads the next entity out of the
result, searches for it, and answers; it reads facts only from search results. Questions
from a file do not say which facts lead to the answer, so their episodes have no expert.

What this env does not do: reward the search itself (only the final answer scores), or
stop a model from answering a guessable question without searching.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from palaestra.envs.errors import EnvConfigError, ResetNeededError, TaskSourceError
from palaestra.envs.jsonl import read_jsonl
from palaestra.envs.search.client import HttpRetriever
from palaestra.envs.search.encyclopedia import Encyclopedia, EncyclopediaOracle
from palaestra.envs.search.retrieval import BM25Retriever, Document, Retriever, read_corpus
from palaestra.envs.tasks import Split, Task, check_split, stable_hash
from palaestra.envs.tool_calls import ParsedTurn, ToolCall
from palaestra.envs.tool_env import Outcome, ToolEnv
from palaestra.envs.tools import Tool
from palaestra.envs.verify import last_boxed

# ---------------------------------------------------------------------- answer scoring


class AnswerExtraction(str, Enum):
    """Where the final answer sits in the model's last reply."""

    BOXED = "boxed"
    """The last ``\\boxed{...}``; a reply without one has no answer."""
    ANSWER_TAG = "answer_tag"
    """The last ``<answer>...</answer>`` (Search-R1's format)."""
    WHOLE_REPLY = "whole_reply"
    """The whole reply."""


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HOW_TO_ANSWER = {
    AnswerExtraction.BOXED: "put the final answer in \\boxed{}",
    AnswerExtraction.ANSWER_TAG: "put the final answer between <answer> and </answer>",
    AnswerExtraction.WHOLE_REPLY: "reply with the answer alone",
}


def extract_search_answer(reply: str, extraction: AnswerExtraction) -> str | None:
    """The answer in ``reply`` as ``extraction`` finds it, or None."""
    if extraction is AnswerExtraction.BOXED:
        return last_boxed(reply)
    if extraction is AnswerExtraction.ANSWER_TAG:
        tags = _ANSWER_TAG.findall(reply)
        return tags[-1] if tags else None
    return reply


def normalize_text(text: str) -> str:
    """Lower case, without punctuation, the articles a/an/the, or repeated spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer, else 0.0."""
    return float(any(normalize_text(prediction) == normalize_text(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 between the normalised prediction and a gold answer."""
    predicted = normalize_text(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_text(answer).split()
        overlap = sum((Counter(predicted) & Counter(gold)).values())
        if overlap:
            precision, recall = overlap / len(predicted), overlap / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---------------------------------------------------------------------------- questions


class SearchQuestions:
    """A ``TaskSource`` of search questions (``Task.metadata["answers"]`` lists every gold
    answer); a question is in the test split when a stable hash of its text falls under
    ``test_fraction``."""

    def __init__(
        self, tasks: Sequence[Task], split: Split = "train", test_fraction: float = 0.1
    ) -> None:
        if not 0.0 < test_fraction < 1.0:
            raise TaskSourceError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        self.split = check_split(split)
        self._tasks = [t for t in tasks if _split_of(t.question, test_fraction) == self.split]
        if not self._tasks:
            raise TaskSourceError(f"the {split!r} split of {len(tasks)} questions is empty.")

    @classmethod
    def builtin(
        cls, split: Split = "train", seed: int = 0, test_fraction: float = 0.1
    ) -> SearchQuestions:
        """The questions of the generated encyclopedia of ``seed``."""
        tasks = [
            Task(
                task_id=f"encyclopedia/seed{seed}/{i}",
                question=q.question,
                answer=q.answer,
                metadata={
                    "answers": [q.answer],
                    "subject": q.subject,
                    "relations": list(q.relations),
                },
            )
            for i, q in enumerate(builtin_encyclopedia(seed).questions)
        ]
        return cls(tasks, split, test_fraction)

    @classmethod
    def from_jsonl(
        cls, path: str | Path, split: Split = "train", test_fraction: float = 0.1
    ) -> SearchQuestions:
        """Questions from a JSON-lines file of ``{"question", "answers": [...]}`` objects
        (an optional ``"id"``; other keys go to ``Task.metadata``)."""
        return cls(read_questions(Path(path)), split, test_fraction)

    def __len__(self) -> int:
        return len(self._tasks)

    def __getitem__(self, index: int) -> Task:
        return self._tasks[index]


def _split_of(question: str, test_fraction: float) -> Split:
    return "test" if stable_hash(f"search\x00{question}") / 2**64 < test_fraction else "train"


def read_questions(path: Path) -> list[Task]:
    """Every question of a JSON-lines file; a bad line raises ``TaskSourceError`` (file:line)."""
    return [
        _question_from_record(record, f"{path}:{number}", f"{path.name}:{number}")
        for number, record in read_jsonl(path, what="question file", example=_QUESTION_EXAMPLE)
    ]


_QUESTION_EXAMPLE = '{"question": "Who founded the Mokesh Guild?", "answers": ["Bela Dravik"]}'


def _question_from_record(record: dict[str, Any], where: str, default_id: str) -> Task:
    question, answers = record.pop("question", None), record.pop("answers", None)
    if not (isinstance(question, str) and question.strip() and _is_answer_list(answers)):
        raise TaskSourceError(
            f"{where}: each line must be an object with a non-empty 'question' and a "
            f"non-empty list of string 'answers', e.g. {_QUESTION_EXAMPLE}."
        )
    task_id = str(record.pop("id", default_id))
    return Task(task_id, question, answers[0], {"answers": answers, **record})


def _is_answer_list(answers: Any) -> bool:
    return isinstance(answers, list) and bool(answers) and all(isinstance(a, str) for a in answers)


# ---------------------------------------------------------------------------- retrievers


@functools.lru_cache(maxsize=4)
def builtin_encyclopedia(seed: int) -> Encyclopedia:
    """The generated encyclopedia of ``seed`` (built once per process)."""
    return Encyclopedia.generate(seed)


@functools.lru_cache(maxsize=8)
def _shared_retriever(kind: str, key: str) -> Retriever:
    """One retriever per document source, shared by every env of the process: an index is
    built or loaded once, and a server's connections are pooled once."""
    if kind == "builtin":
        return BM25Retriever.build(builtin_encyclopedia(int(key)).documents)
    if kind == "corpus":
        return BM25Retriever.build(read_corpus(key))
    if kind == "index":
        return BM25Retriever.load(key)
    return HttpRetriever(key)


def render_results(documents: Sequence[Document], max_chars: int) -> str:
    """Search results as the model reads them: ``[id] title`` then the clipped text."""
    if not documents:
        return "No document matched the query."
    blocks = []
    for d in documents:
        text = d.text if len(d.text) <= max_chars else d.text[: max_chars - 3].rstrip() + "..."
        blocks.append(f"[{d.id}] {d.title}\n{text}")
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------------- env

SEARCH_SYSTEM_PROMPT = (
    "Answer the question by searching a reference corpus with the search tool; the facts are "
    "not common knowledge, so do not guess. Search for one name at a time and read the "
    "results. When you know the answer, reply without calling a tool and {how}."
)
"""The default system message; ``{how}`` says how to mark the answer."""


class SearchEnv(ToolEnv):
    """Answer questions with a ``search`` tool over a corpus; EM/F1 reward on the final answer."""

    def __init__(
        self,
        split: Split = "train",
        seed: int = 0,
        questions: str | None = None,
        corpus: str | None = None,
        index: str | None = None,
        retriever_url: str | None = None,
        retriever: Retriever | None = None,
        top_k: int = 3,
        max_doc_chars: int = 300,
        max_queries: int = 4,
        max_turns: int = 5,
        answer_extraction: str | AnswerExtraction = AnswerExtraction.BOXED,
        f1_weight: float = 0.0,
        test_fraction: float = 0.1,
        search_timeout_s: float = 30.0,
        **options: Any,
    ) -> None:
        """Args:
        split: ``"train"`` or ``"test"``.
        seed: the built-in encyclopedia to generate (when ``questions`` or the corpus is
            not given).
        questions: a JSON-lines question file; default: the built-in questions.
        corpus, index, retriever_url, retriever: where documents come from (at most one;
            see the module docstring).
        top_k: documents per search.
        max_doc_chars: characters of each document's text shown; longer ones are clipped.
        max_queries: searches per episode; later ones get an error result.
        max_turns: assistant messages per episode, the answer included.
        answer_extraction: ``"boxed"``, ``"answer_tag"`` or ``"whole_reply"``.
        f1_weight: the reward's weight on token F1 (the rest is on exact match).
        test_fraction: the share of questions held out for the test split.
        search_timeout_s: seconds one search may take, retries included; past it the
            episode is an infrastructure failure.
        **options: other ``ToolEnv`` options (``tool_format``, ``system_prompt``,
            ``tools_in_prompt``).
        """
        try:
            self.answer_extraction = AnswerExtraction(answer_extraction)
        except ValueError:
            allowed = [e.value for e in AnswerExtraction]
            raise EnvConfigError(
                f"answer_extraction must be one of {allowed}, got {answer_extraction!r}."
            ) from None
        if not 0.0 <= f1_weight <= 1.0 or top_k < 1 or max_doc_chars < 20:
            raise EnvConfigError(
                f"SearchEnv needs 0 <= f1_weight <= 1, top_k >= 1 and max_doc_chars >= 20; got "
                f"{f1_weight}, {top_k} and {max_doc_chars}."
            )
        self.retriever = _make_retriever(seed, corpus, index, retriever_url, retriever)
        self.top_k = top_k
        self.max_doc_chars = max_doc_chars
        self.f1_weight = f1_weight
        tasks = (
            SearchQuestions.builtin(split, seed, test_fraction)
            if questions is None
            else SearchQuestions.from_jsonl(questions, split, test_fraction)
        )
        options.setdefault(
            "system_prompt", SEARCH_SYSTEM_PROMPT.format(how=_HOW_TO_ANSWER[self.answer_extraction])
        )
        search = Tool.from_function(self.search, timeout=search_timeout_s)
        super().__init__(
            tasks, [search], split=split, max_turns=max_turns, max_tool_calls=max_queries, **options
        )

    async def search(self, query: str) -> str:
        """Search the reference corpus; returns the best-matching documents with their ids.

        Args:
            query: Words to look for, e.g. a person's or a place's name.
        """
        if not query.strip():
            raise ValueError("the query is empty; write the words to look for")
        return render_results(await self.retriever.search(query, self.top_k), self.max_doc_chars)

    def scores(self, task: Task, reply: str) -> dict[str, float]:
        """``{"exact_match", "f1"}`` of the answer in ``reply`` against the task's answers."""
        answer = extract_search_answer(reply, self.answer_extraction)
        if answer is None:
            return {"exact_match": 0.0, "f1": 0.0}
        answers = task.metadata.get("answers", [task.answer])
        return {"exact_match": exact_match(answer, answers), "f1": token_f1(answer, answers)}

    def verify(self, task: Task, answer: str) -> float:
        """The reward of a final reply: exact match and token F1, mixed by ``f1_weight``."""
        scores = self.scores(task, answer)
        return (1.0 - self.f1_weight) * scores["exact_match"] + self.f1_weight * scores["f1"]

    def expert_action(self) -> str:
        """The expert's next message (``ScriptedSolver``) on a built-in question: a ``search``
        call for the next entity of the question's chain of facts, or the boxed answer once
        the results hold it. It re-runs the episode's earlier searches with the env's own
        ``search`` tool to read them (a sync call: from async code, run it in a thread)."""
        if self.task is None:
            raise ResetNeededError("SearchEnv.expert_action() needs an open episode: reset().")
        if "relations" not in self.task.metadata:
            raise EnvConfigError(
                f"SearchEnv has no expert for task {self.task.task_id!r}: only the built-in "
                "questions name the facts that lead to their answers (metadata 'subject' and "
                "'relations'); questions from a file have none."
            )
        search = self.tools["search"]
        results = [search.call(call.arguments) for call in self.stats.calls]
        oracle = EncyclopediaOracle(
            lambda query: self.format.render([ToolCall("search", {"query": query})])
        )
        return oracle.reply(
            self.task.metadata["subject"], tuple(self.task.metadata["relations"]), results
        )

    def _end(self, task: Task, parsed: ParsedTurn) -> Outcome:
        # ToolEnv scores the final reply with verify() as "correct"; this adds its parts and
        # counts an exact match (not any F1 of 1) as success.
        observation, reward, terminated, truncated, info = super()._end(task, parsed)
        if terminated:
            scores = self.scores(task, parsed.content)
        else:
            scores = {"exact_match": 0.0, "f1": 0.0}
        info["reward_components"] |= scores
        info["success"] = scores["exact_match"] == 1.0
        return observation, reward, terminated, truncated, info


def _make_retriever(
    seed: int,
    corpus: str | None,
    index: str | None,
    retriever_url: str | None,
    retriever: Retriever | None,
) -> Retriever:
    given = {
        "corpus": corpus,
        "index": index,
        "retriever_url": retriever_url,
        "retriever": retriever,
    }
    chosen = [name for name, value in given.items() if value is not None]
    if len(chosen) > 1:
        raise EnvConfigError(f"give at most one document source, got {chosen}.")
    if retriever is not None:
        return retriever
    if retriever_url is not None:
        return _shared_retriever("url", retriever_url)
    if corpus is not None:
        return _shared_retriever("corpus", str(Path(corpus).resolve()))
    if index is not None:
        return _shared_retriever("index", str(Path(index).resolve()))
    return _shared_retriever("builtin", str(seed))
