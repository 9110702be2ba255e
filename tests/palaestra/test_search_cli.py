"""``palaestra search`` and a GRPO run on palaestra/Search-v0, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest


def palaestra(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "palaestra", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def served_index(tmp_path):
    """The built-in encyclopedia, generated, indexed and served by the CLI; yields the URL."""
    out = palaestra("search", "generate", "--out", str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr
    assert "192 documents" in out.stdout
    out = palaestra(
        "search", "index", str(tmp_path / "data" / "corpus.jsonl"), "--out", str(tmp_path / "index")
    )
    assert out.returncode == 0, out.stderr
    command = ["search", "serve", "--index", str(tmp_path / "index"), "--port", "0"]
    server = subprocess.Popen(
        [sys.executable, "-m", "palaestra", *command], stdout=subprocess.PIPE, text=True
    )
    try:
        yield server.stdout.readline().split()[-1]  # "serving N documents on http://..."
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


def test_generate_index_and_serve_through_the_cli(served_index):
    health = httpx.get(f"{served_index}/health", trust_env=False)
    assert health.json() == {"status": "ok", "documents": 192}
    found = httpx.post(
        f"{served_index}/search", json={"query": "Lomel", "k": 2}, trust_env=False
    ).json()["documents"]
    assert found[0]["title"] == "Lomel" and found[0]["id"].startswith("wiki-")


def test_serving_a_missing_index_is_a_one_line_error_with_the_fix(tmp_path):
    out = palaestra("search", "serve", "--index", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "palaestra search index CORPUS.jsonl --out" in out.stderr


@pytest.mark.slow
def test_grpo_on_the_search_env_against_a_shared_server(tmp_path, served_index):
    out = palaestra(
        "train",
        "examples/search_grpo.yaml",
        "model=tiny-random",
        f"env.kwargs.retriever_url={served_index}",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.max_tokens=16",
        "rollout.max_turns=3",
        "trainer.steps=2",
        "trainer.micro_batch_size=4",
        "eval.num_tasks=4",
        "run.progress=false",
        f"run.output_dir={tmp_path}",
        "run.name=search",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [
        json.loads(x) for x in (tmp_path / "search" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["infra_failures"] == 0 for r in train)
    trajectories = (tmp_path / "search" / "trajectories.jsonl").read_text().splitlines()
    assert trajectories
    assert all(
        set(json.loads(t)["reward_components"]) <= {"correct", "exact_match", "f1"}
        for t in trajectories
    )
