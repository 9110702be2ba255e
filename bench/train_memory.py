"""A training run's memory step by step: does it stay flat?

    python -m bench.train_memory examples/tool_grpo.yaml --steps 30
    python -m bench.train_memory examples/tool_grpo.yaml --steps 3 model=tiny-random eval.num_tasks=0

Runs ``palaestra train CONFIG trainer.steps=N`` (plus any dotted overrides) in a fresh
process, writing its run directory to a temporary folder, and reads back the per-step
``memory/rss_gb`` and ``memory/peak_rss_gb`` the stage loops log to ``metrics.jsonl``.
Meanwhile a thread samples the whole process tree's proportional set size (engine worker
processes included, which the trainer's own figures do not see). The report lists every
step and a verdict: flat when the RSS of the last step exceeds the RSS after the warm-up
steps by no more than ``TOLERANCE``.

What this does not do: compare against a peer, or decide which config to measure (the
issue's target is 30 steps of ``examples/tool_grpo.yaml``, which takes hours on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.grpo_vs_trl import tree_pss_bytes

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2
"""Steps excluded from the start level: the first steps allocate the optimizer state and
fill the allocator's caches."""
TOLERANCE = (0.05, 0.1)
"""Flat when the last step's RSS <= the start level + max(5% of it, 0.1 GiB)."""


def read_steps(metrics: Path) -> list[dict[str, float]]:
    """The per-step memory figures of a run's ``metrics.jsonl``."""
    rows = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "memory/rss_gb" in record and "step" in record:
            rows.append(
                {
                    "step": record["step"],
                    "rss_gb": round(record["memory/rss_gb"], 3),
                    "peak_rss_gb": round(record["memory/peak_rss_gb"], 3),
                }
            )
    return rows


def verdict(steps: list[dict[str, float]]) -> str:
    """ "flat", or how much the RSS grew after the warm-up steps."""
    if len(steps) <= WARMUP_STEPS:
        return f"too few steps ({len(steps)}) past the {WARMUP_STEPS} warm-up steps to judge"
    start, end = steps[WARMUP_STEPS]["rss_gb"], steps[-1]["rss_gb"]
    allowed = max(TOLERANCE[0] * start, TOLERANCE[1])
    if end - start <= allowed:
        return "flat"
    return f"grew {end - start:.2f} GiB after step {steps[WARMUP_STEPS]['step']} (> {allowed:.2f})"


def measure(config: str, steps: int, overrides: list[str], interval_s: float) -> dict[str, Any]:
    """Train ``steps`` steps of ``config``; per-step memory, sampled tree PSS, a verdict."""
    with tempfile.TemporaryDirectory(prefix="palaestra-train-memory-") as out:
        command = [
            sys.executable, "-m", "palaestra", "train", config, f"trainer.steps={steps}",
            f"run.output_dir={out}", "run.name=run", "run.progress=false", *overrides,
        ]  # fmt: skip
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        tree: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(interval_s):
                tree.append((time.monotonic() - started, tree_pss_bytes(process.pid) / 2**30))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, stderr = process.communicate()
        stop.set()
        sampler.join()
        if process.returncode != 0:
            raise RuntimeError(f"palaestra train failed ({process.returncode}): {stderr[-2000:]}")
        rows = read_steps(Path(out) / "run" / "metrics.jsonl")
    return {
        "config": config,
        "overrides": overrides,
        "wall_s": round(time.monotonic() - started, 1),
        "steps": rows,
        "tree_pss_gb": {
            "max": round(max((g for _, g in tree), default=0.0), 3),
            "samples": [(round(t, 1), round(g, 3)) for t, g in tree],
        },
        "verdict": verdict(rows),
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['config']} {' '.join(report['overrides'])}: {report['wall_s']} s"]
    lines += ["step  rss_gb  peak_rss_gb"]
    lines += [
        f"{r['step']:>4}  {r['rss_gb']:>6.2f}  {r['peak_rss_gb']:>11.2f}" for r in report["steps"]
    ]
    lines.append(f"process tree PSS max: {report['tree_pss_gb']['max']:.2f} GiB")
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="a palaestra training config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--interval-s", type=float, default=2.0, help="tree PSS sampling")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_intermixed_args(argv)
    report = measure(args.config, args.steps, args.overrides, args.interval_s)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0 if report["verdict"] == "flat" else 1


if __name__ == "__main__":
    raise SystemExit(main())
