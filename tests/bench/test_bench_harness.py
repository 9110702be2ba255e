"""The benchmark harness writes its report (figures are the machine's, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_components_run_writes_a_markdown_and_json_report(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "components",
            "gpu",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "report.json").read_text())
    assert data["machine"]["cores"] >= 1 and "torch" in data["machine"]["packages"]
    titles = [s["title"] for s in data["sections"]]
    assert titles[:2] == [
        "Rollout concurrency: an env whose step sleeps (I/O-bound tool)",
        "Math verifier",
    ]
    rollout = data["sections"][0]["data"]
    assert (
        rollout["ratio"] == rollout["episodes/s, concurrent"] / rollout["episodes/s, one at a time"]
    )
    markdown = (out / "report.md").read_text()
    assert "episodes in flight" in markdown and "answers/s" in markdown
    assert "## GPU" in markdown


def _own_pss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def test_peak_memory_counts_engine_child_processes():
    # vLLM's engine runs in child processes: their memory is the run's memory too. This
    # process's own memory moves while other tests' leftovers are freed, so the child's
    # share is measured against this process's memory at the same moment, not earlier.
    from bench.grpo_vs_trl import TreePeak, tree_pss_bytes

    tree = TreePeak(interval_s=0.05)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; x = b'1' * 300_000_000; print(); time.sleep(2)"],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    child.stdout.readline()  # the child holds its 300 MB now
    child_alone = tree_pss_bytes(child.pid)
    own = _own_pss_bytes()
    with_child = tree_pss_bytes(os.getpid())
    child.wait()
    peak_gib = tree.stop()

    assert child_alone > 250e6
    assert with_child - own > 0.9 * child_alone
    assert peak_gib * 2**30 > 0.9 * (own + child_alone)


def test_a_failing_benchmark_keeps_the_figures_already_measured(tmp_path, monkeypatch):
    import bench.__main__ as harness

    def grpo_that_fails_on_its_second_run(quick):
        yield {"title": "first run", "rows": [{"tokens/s": 1.0}]}
        raise RuntimeError("the engine died")

    monkeypatch.setattr(harness, "grpo_sections", grpo_that_fails_on_its_second_run)
    code = harness.main(["--quick", "--only", "grpo", "gpu", "--out", str(tmp_path)])

    assert code == 1
    titles = [s["title"] for s in json.loads((tmp_path / "report.json").read_text())["sections"]]
    assert titles[:2] == ["first run", "grpo: failed"] and titles[2].startswith("GPU")
    assert "RuntimeError: the engine died" in (tmp_path / "report.md").read_text()
