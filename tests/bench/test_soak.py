"""The soak's quick form: concurrent sandboxed tool episodes, sampled; every descriptor and
process they opened is gone afterwards. A leak of one descriptor or process per episode
fails here (a quick run plays over a hundred episodes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import FD_TOLERANCE

ROOT = Path(__file__).resolve().parents[2]


def test_quick_soak_samples_the_tree_and_leaves_no_descriptor_or_process(tmp_path):
    if shutil.which("bwrap") is None:
        pytest.skip(
            "the soak runs its episodes in the bubblewrap sandbox: apt-get install bubblewrap"
        )
    out = tmp_path / "soak.json"

    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a series did not stay flat
    report = json.loads(out.read_text())
    phases = [s["phase"] for s in report["samples"]]
    assert phases[0] == "before" and phases[-1] == "after" and phases.count("load") >= 10
    assert report["episodes"] >= 64 and "env_error" not in report["outcomes"]
    series = report["series"]
    assert series["processes"]["max"] > series["processes"]["before"]  # sandboxes were seen
    assert series["fds"]["max"] > series["fds"]["before"]
    assert series["fds"]["after"] <= series["fds"]["before"] + FD_TOLERANCE
    assert series["processes"]["after"] == series["processes"]["before"]
    assert report["verdict"]["fds"] == "flat" and report["verdict"]["processes"] == "flat"
    assert set(series["pss_mib"]) == {"before", "start", "end", "max", "slope_per_min", "after"}
