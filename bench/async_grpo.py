"""Asynchronous against synchronous GRPO: step throughput as a ratio, and weight-sync latency.

Runs the main job's task (``examples/math_grpo.yaml``) for a few steps with
``rollout.max_staleness`` 0 (synchronous: each step samples on the previous step's
weights) and 1 (the next step samples while the learner trains), for each engine asked
for, one after the other in this process. Prints per run: the median step time after the
first step (the first has nothing to overlap with), sampled tokens per second over whole
steps, the median weight-sync time, and the async/sync ratio per engine.

    .venv/bin/python bench/async_grpo.py --engines transformers vllm --steps 6

The vllm engine needs ``make setup-vllm``. On a machine whose cores are all busy with
either phase, overlap has little to win: the learner and the engine share the same cores.
Numbers, not assertions: the machine decides them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from palaestra.config import load_config
from palaestra.rundir import RunDir
from palaestra.trainer.stages.grpo import run_grpo

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "math_grpo.yaml"


def run_once(engine: str, max_staleness: int, args: argparse.Namespace, out: Path) -> dict:
    config = load_config(
        CONFIG,
        [
            f"engine={engine}",
            f"rollout.max_staleness={max_staleness}",
            f"rollout.tasks_per_step={args.tasks_per_step}",
            f"trainer.steps={args.steps}",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
            "run.log_trajectories=0",
        ],
    )
    name = f"{engine}-staleness{max_staleness}"
    run = RunDir(out / name, config.model_dump(mode="json"))
    run_grpo(config, run)
    run.close()
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if r["kind"] == "train"][1:]
    episodes = args.tasks_per_step * config.rollout.group_size
    step_s = [r["time/step_s"] for r in steps]
    return {
        "engine": engine,
        "max_staleness": max_staleness,
        "median_step_s": statistics.median(step_s),
        "sampled_tokens_per_s": sum(r["tokens_mean"] * episodes for r in steps) / sum(step_s),
        "median_sync_s": statistics.median(r["time/sync_s"] for r in steps),
        "median_train_s": statistics.median(r["time/train_s"] for r in steps),
        "median_rollout_wait_s": statistics.median(r["time/rollout_wait_s"] for r in steps),
        "mean_staleness": statistics.mean(r["staleness/mean"] for r in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tasks-per-step", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            for max_staleness in (0, 1):
                results.append(run_once(engine, max_staleness, args, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    print()
    print(
        "| engine | max_staleness | step s (median) | sampled tok/s | train s | wait for rollouts s | sync s | mean staleness |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['engine']} | {r['max_staleness']} | {r['median_step_s']:.1f} | "
            f"{r['sampled_tokens_per_s']:.1f} | {r['median_train_s']:.1f} | "
            f"{r['median_rollout_wait_s']:.1f} | {r['median_sync_s']:.2f} | "
            f"{r['mean_staleness']:.2f} |"
        )
    for engine in args.engines:
        sync, asynchronous = (r for r in results if r["engine"] == engine)
        ratio = asynchronous["sampled_tokens_per_s"] / sync["sampled_tokens_per_s"]
        print(f"{engine}: async / sync throughput = {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
