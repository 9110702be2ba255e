"""Retrievers: ``Retriever`` (the plug point), ``Document``, and local BM25 over ``bm25s``.

A retriever answers ``await retriever.search(query, k)`` with at most ``k`` documents, best
first. Two implementations ship: ``BM25Retriever`` (in this process) and
``HttpRetriever`` (``client.py``: a retrieval server shared by many rollout workers,
``server.py``). Both give the same documents for the same index and query: ranking is
by BM25 score, ties broken by corpus position, and documents that match no query term
are never returned.

An index on disk is a directory written by ``BM25Retriever.save`` (``bm25s``'s files,
the corpus included); ``palaestra search index CORPUS.jsonl --out DIR`` builds one.

What this module does not do: dense retrieval, stemming, or any network I/O.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from palaestra.envs.errors import EnvError, TaskSourceError, ToolInfraError
from palaestra.envs.jsonl import read_jsonl

MAX_K = 100
"""The most documents one search may ask for."""


class RetrievalError(EnvError):
    """A retrieval request that cannot be served as asked (bad query, bad ``k``)."""


class IndexNotFoundError(EnvError, FileNotFoundError):
    """An index directory that does not exist or holds no palaestra BM25 index."""


class RetrieverUnavailableError(ToolInfraError):
    """The retrieval backend could not be reached or kept failing (retries exhausted).

    A ``ToolInfraError``: raised from a search tool, it ends the episode as an
    infrastructure failure (``tool_error``) instead of showing the model an error."""


@dataclass(frozen=True)
class Document:
    """One retrieved passage."""

    id: str
    """The document's id in its corpus (shown to the model with the text)."""
    title: str
    """The document's title (may be empty)."""
    text: str
    """The document's text."""
    score: float = 0.0
    """The retriever's relevance score for the query (higher is better)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the four fields."""
        return asdict(self)


@runtime_checkable
class Retriever(Protocol):
    """Anything that ranks documents for a text query."""

    async def search(self, query: str, k: int) -> list[Document]:
        """At most ``k`` documents for ``query``, best first."""
        ...


def check_search_request(query: object, k: object) -> tuple[str, int]:
    """``(query, k)`` if ``query`` is a non-empty string and ``k`` an int in [1, MAX_K],
    else ``RetrievalError`` saying which is wrong."""
    if not isinstance(query, str) or not query.strip():
        raise RetrievalError(f"'query' must be a non-empty string, got {query!r:.80}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise RetrievalError(f"'k' must be an integer from 1 to {MAX_K}, got {k!r:.80}.")
    return query, k


# ------------------------------------------------------------------------------- corpus


def read_corpus(path: str | Path) -> list[Document]:
    """The documents of a JSON-lines corpus, one ``{"id", "title", "text"}`` object a line.

    ``title`` may be missing (empty); ids must be unique. A bad line raises
    ``TaskSourceError`` naming the file and line.
    """
    documents: list[Document] = []
    seen: set[str] = set()
    for number, record in read_jsonl(path, what="corpus file", example=_DOCUMENT_EXAMPLE):
        document = _document_from_record(record, f"{path}:{number}")
        if document.id in seen:
            raise TaskSourceError(f"{path}:{number}: duplicate document id {document.id!r}.")
        seen.add(document.id)
        documents.append(document)
    if not documents:
        raise TaskSourceError(f"corpus file {path} holds no documents.")
    return documents


_DOCUMENT_EXAMPLE = '{"id": "d1", "title": "Orvane", "text": "Orvane is a city ..."}'


def _document_from_record(record: dict[str, Any], where: str) -> Document:
    doc_id, title, text = record.get("id"), record.get("title", ""), record.get("text")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise TaskSourceError(f"{where}: 'id' must be a string or an integer, got {doc_id!r}.")
    if not isinstance(title, str) or not isinstance(text, str) or not text.strip():
        raise TaskSourceError(f"{where}: 'title' must be a string and 'text' a non-empty string.")
    return Document(id=str(doc_id), title=title, text=text)


def write_corpus(documents: Sequence[Document], path: str | Path) -> None:
    """Write ``documents`` as a JSON-lines corpus (``id``, ``title``, ``text``)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for d in documents:
            out.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n")


# --------------------------------------------------------------------------------- BM25


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens of two or more characters, English stop words removed."""
    import bm25s

    tokens: list[list[str]] = bm25s.tokenize(texts, return_ids=False, show_progress=False)
    return tokens


class BM25Retriever:
    """BM25 (Lucene variant, ``bm25s``) over a corpus held in memory; title and text are indexed."""

    def __init__(self, bm25: Any, documents: Sequence[Document]) -> None:
        """Use ``BM25Retriever.build`` or ``BM25Retriever.load``; this wraps a built index."""
        self._bm25 = bm25
        self.documents = list(documents)

    @classmethod
    def build(cls, documents: Sequence[Document]) -> BM25Retriever:
        """Index ``documents`` (seconds for ~100k short passages on one core)."""
        import bm25s

        if not documents:
            raise RetrievalError("cannot build a BM25 index over an empty corpus.")
        texts = [f"{d.title}\n{d.text}" for d in documents]
        bm25 = bm25s.BM25()
        bm25.index(bm25s.tokenize(texts, show_progress=False), show_progress=False)
        return cls(bm25, documents)

    def save(self, directory: str | Path) -> None:
        """Write the index and its corpus to ``directory`` (created if missing)."""
        corpus = [{"id": d.id, "title": d.title, "text": d.text} for d in self.documents]
        self._bm25.save(str(directory), corpus=corpus, show_progress=False)

    @classmethod
    def load(cls, directory: str | Path) -> BM25Retriever:
        """Load an index written by ``save``; a missing one raises ``IndexNotFoundError``."""
        import bm25s

        directory = Path(directory)
        missing = [name for name in _INDEX_FILES if not (directory / name).is_file()]
        if missing:
            what = "does not exist" if not directory.is_dir() else f"lacks {', '.join(missing)}"
            raise IndexNotFoundError(
                f"no BM25 index at {directory}: the directory {what}. Build one with "
                f"`palaestra search index CORPUS.jsonl --out {directory}`."
            )
        bm25 = bm25s.BM25.load(str(directory), load_corpus=True, show_progress=False)
        documents = [
            Document(id=str(r["id"]), title=r["title"], text=r["text"]) for r in bm25.corpus
        ]
        bm25.corpus = None
        return cls(bm25, documents)

    def search_now(self, query: str, k: int) -> list[Document]:
        """The synchronous search, in the calling thread."""
        query, k = check_search_request(query, k)
        token_ids = self._bm25.get_tokens_ids(tokenize([query])[0])
        if not token_ids:
            return []
        scores = self._bm25.get_scores_from_ids(token_ids)
        return [
            Document(d.id, d.title, d.text, float(scores[i]))
            for i in top_k_indices(scores, k)
            for d in [self.documents[i]]
        ]

    async def search(self, query: str, k: int) -> list[Document]:
        """``search_now`` in a worker thread, so a large index does not stall the event loop."""
        return await asyncio.to_thread(self.search_now, query, k)


_INDEX_FILES = ("params.index.json", "vocab.index.json", "data.csc.index.npy", "corpus.jsonl")


def top_k_indices(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest positive scores, best first, ties by lower index."""
    candidates = np.flatnonzero(scores > 0)
    if len(candidates) > k:
        kth_best = np.partition(scores[candidates], -k)[-k]
        candidates = candidates[scores[candidates] >= kth_best]
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    return [int(i) for i in candidates[order]]
