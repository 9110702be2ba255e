"""The benchmark harness writes its report (figures are the machine's, never asserted)."""

from __future__ import annotations

import json
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
