"""Shared fixtures: the tiny random model's tokenizer and a small JSONL math task file."""

from __future__ import annotations

import json

import pytest

from palaestra.models import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer and chat template (shared by tiny-random and the embedded model)."""
    return load_tokenizer("tiny-random")


@pytest.fixture
def math_tasks(tmp_path):
    """A JSONL file of 8 addition questions."""
    path = tmp_path / "tasks.jsonl"
    rows = [{"question": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(1, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
