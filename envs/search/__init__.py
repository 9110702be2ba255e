"""palaestra.envs.search: search environments and the retrieval service they share.

- ``retrieval``: the ``Retriever`` protocol, ``Document``, BM25 over ``bm25s`` (build, save,
  load), JSON-lines corpora.
- ``server``: the aiohttp retrieval server (``palaestra search serve``).
- ``client``: ``HttpRetriever``, its client, with timeouts and retries.
- ``encyclopedia``: a seeded fictional encyclopedia with single- and multi-hop questions,
  and a scripted oracle searcher.
- ``env``: ``SearchEnv`` (``palaestra/Search-v0``), exact-match and token-F1 scoring.

Nothing here imports torch; aiohttp is imported only by ``server``.
"""

from palaestra.envs.search.client import HttpRetriever
from palaestra.envs.search.encyclopedia import Encyclopedia, EncyclopediaOracle, Question
from palaestra.envs.search.env import (
    AnswerExtraction,
    SearchEnv,
    SearchQuestions,
    exact_match,
    normalize_text,
    token_f1,
)
from palaestra.envs.search.retrieval import (
    BM25Retriever,
    Document,
    IndexNotFoundError,
    RetrievalError,
    Retriever,
    RetrieverUnavailableError,
    read_corpus,
    write_corpus,
)

__all__ = [
    "AnswerExtraction",
    "BM25Retriever",
    "Document",
    "Encyclopedia",
    "EncyclopediaOracle",
    "HttpRetriever",
    "IndexNotFoundError",
    "Question",
    "RetrievalError",
    "Retriever",
    "RetrieverUnavailableError",
    "SearchEnv",
    "SearchQuestions",
    "exact_match",
    "normalize_text",
    "read_corpus",
    "token_f1",
    "write_corpus",
]
