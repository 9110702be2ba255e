"""Soak: hundreds of concurrent sandboxed tool episodes for minutes; memory, open files and
processes must stay flat.

    python -m bench.soak                       # 256 episodes in flight for 10 minutes
    python -m bench.soak --quick               # 64 in flight for 15 s (tests/bench/test_soak.py)
    python -m bench.soak --duration-s 120 --out soak.json

The load is ``palaestra/HumanEvalTool-v0``, a multi-turn env whose ``run_python`` tool and
final grading both run programs in the bubblewrap sandbox (a pool of one sandbox per core,
as the code envs share it). ``--in-flight`` workers each play episode after episode through
the real rollout (``agent.rollout.run_episode`` over an ``EnvPool``) until the time is up.
The policy is ``ScriptedCoder``, an engine that samples nothing: it calls ``run_python``
once, then replies with the task's reference solution, so the soak loads the env, the
sandbox and the rollout, not a model.

Every ``--interval-s`` a thread samples this process and its descendants: memory (the sum
of their proportional set sizes, ``bench.grpo_vs_trl.tree_pss_bytes``), open file
descriptors (``/proc/<pid>/fd`` over the tree), processes and this process's threads. The
report gives each series' start (first sample after the warm-up), end, max and slope, and
a verdict: memory is flat when end - start stays within ``MEMORY_TOLERANCE`` (the larger of
a fraction of start and a fixed amount); open files and processes are flat when, after the
episodes and the pools are closed, they are back at their level before the soak (within
``FD_TOLERANCE``; processes exactly), so no run may leave a descriptor or a process behind.

What this does not do: assert anything (``tests/bench/test_soak.py`` checks the quick
form's report), measure a model or a trainer (``bench/train_memory.py`` samples a
training run's memory per step), or load other backends than bubblewrap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.grpo_vs_trl import tree_pss_bytes
from palaestra.agent.engines.base import Completion, SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import (
    EnvPool,
    EpisodeRequest,
    RolloutLimits,
    reserve_threads,
    run_episode,
)
from palaestra.envs import make
from palaestra.envs.humaneval import humaneval_tasks
from palaestra.models import load_tokenizer

ENV_ID = "palaestra/HumanEvalTool-v0"
MiB = 1 << 20
WARMUP_FRACTION = 0.2
"""The first part of the run, excluded from the start level: pools, threads and the
allocator's arenas fill up."""
MEMORY_TOLERANCE = (0.05, 64 * MiB)
"""Memory is flat when end - start <= max(5% of start, 64 MiB)."""
FD_TOLERANCE = 4
"""Open descriptors the process may hold after the soak beyond its level before it (lazily
opened files of libraries); a leak of one per run would be thousands."""
TOOL_CALL = (
    '<tool_call>{"name": "run_python", "arguments": {"code": "print(sum(range(10)))"}}</tool_call>'
)
"""The scripted first turn: one ``run_python`` call in the env's Hermes format."""


class ScriptedCoder:
    """An engine that plays HumanEval tool episodes without a model: the first turn calls
    ``run_python``, the next replies with the task's reference solution. It finds the task
    by its question in the decoded prompt, and records nothing (no memory grows with use)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.answers = {task.question[-300:]: task.answer for task in humaneval_tasks()}
        self.tool_call_ids = self._turn(TOOL_CALL)
        self.policy_version = 0

    def _turn(self, text: str) -> list[int]:
        return [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]

    def _reply(self, prompt: str) -> list[int]:
        if "stdout:" not in prompt:  # no tool result yet
            return self.tool_call_ids
        answer = next((a for q, a in self.answers.items() if q in prompt), "```python\npass\n```")
        return self._turn(answer)

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion:
        """The scripted reply to the episode whose prompt this is."""
        await asyncio.sleep(0)
        ids = self._reply(self.tokenizer.decode(prompt_ids))[: sampling.max_tokens]
        return Completion(tuple(ids), (-1.0,) * len(ids), "stop", 0)

    async def update_weights(self, named_tensors: Any, version: int) -> None:
        """No weights to update."""

    async def score(self, token_ids: list[int]) -> list[float]:
        """A constant logprob per token."""
        return [-1.0] * (len(token_ids) - 1)


@dataclass(frozen=True)
class Sample:
    """One reading of this process tree."""

    t_s: float
    """Seconds since the soak started."""
    phase: str
    """``before`` the episodes, under ``load``, ``drain`` (time is up, the episodes in
    flight finish), or ``after`` the pools closed."""
    pss_mib: float
    """Proportional set size of the process and its descendants."""
    fds: int
    """Open file descriptors of the process and its descendants."""
    processes: int
    """The process and its descendants (sandboxes included)."""
    threads: int
    """Threads of this process (the rollout's executor keeps its threads)."""
    episodes: int
    """Episodes finished so far."""


def tree_pids(root: int) -> list[int]:
    """``root`` and every process descended from it, from the kernel's per-thread lists of
    children (``/proc/<pid>/task/<tid>/children``)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # ended while we looked
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                continue
    return found


def open_fds(pids: Sequence[int]) -> int:
    """Open file descriptors of ``pids`` (those still running)."""
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


class Sampler:
    """Samples this process tree every ``interval_s`` from a thread, and on demand."""

    def __init__(self, interval_s: float) -> None:
        self.started = time.monotonic()
        self.samples: list[Sample] = []
        self.phase = "before"
        self.episodes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def sample(self) -> Sample:
        pid = os.getpid()
        pids = tree_pids(pid)
        sample = Sample(
            t_s=round(time.monotonic() - self.started, 2),
            phase=self.phase,
            pss_mib=round(tree_pss_bytes(pid) / MiB, 1),
            fds=open_fds(pids),
            processes=len(pids),
            threads=threading.active_count(),
            episodes=self.episodes,
        )
        self.samples.append(sample)
        return sample

    def start(self) -> None:
        self.sample()
        self.phase = "load"
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.phase = "after"
        self.sample()


async def play(
    duration_s: float, in_flight: int, pool_size: int, sampler: Sampler, stops: Counter
) -> None:
    """``in_flight`` workers play episodes back to back until ``duration_s`` has passed."""
    tokenizer = load_tokenizer("tiny-random")
    engine, renderer = ScriptedCoder(tokenizer), ChatRenderer(tokenizer)
    pool = EnvPool(lambda: make(ENV_ID, sandbox="bubblewrap", pool_size=pool_size), in_flight)
    reserve_threads(in_flight)
    sampling, limits = SamplingParams(max_tokens=1024), RolloutLimits(max_turns=4)
    deadline = time.monotonic() + duration_s
    asyncio.get_running_loop().call_later(duration_s, setattr, sampler, "phase", "drain")

    async def worker(index: int) -> None:
        seed = index
        while time.monotonic() < deadline:
            async with pool.borrow() as env:
                request = EpisodeRequest(group_id=seed, reset_seed=seed)
                trajectory = await run_episode(
                    env, engine, renderer, sampling, request, env_id=ENV_ID, limits=limits
                )
            stops[trajectory.stop_reason.value] += 1
            stops["solved" if trajectory.reward == 1.0 else "not solved"] += 1
            sampler.episodes += 1
            seed += in_flight

    try:
        await asyncio.gather(*(worker(i) for i in range(in_flight)))
    finally:
        pool.close()


def summarize(samples: Sequence[Sample], name: str, warmup_s: float) -> dict[str, float]:
    """One series: its level ``before`` the soak, ``start`` (the first sample under load
    after the warm-up), ``end`` (the last under load), ``max`` (of every sample), the slope
    per minute under load after the warm-up, and its level ``after`` the soak."""
    load = [s for s in samples if s.phase == "load"]
    steady = [s for s in load if s.t_s >= warmup_s] or load[-1:]
    xs = [s.t_s / 60 for s in steady]
    ys = [float(getattr(s, name)) for s in steady]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = (
        sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        if spread
        else 0.0
    )
    return {
        "before": float(getattr(samples[0], name)),
        "start": ys[0],
        "end": ys[-1],
        "max": max(float(getattr(s, name)) for s in samples),
        "slope_per_min": round(slope, 3),
        "after": float(getattr(samples[-1], name)),
    }


def verdicts(series: dict[str, dict[str, float]]) -> dict[str, str]:
    """ "flat" or what grew, per series (see the module docstring for the tolerances)."""
    memory = series["pss_mib"]
    allowed_mib = max(MEMORY_TOLERANCE[0] * memory["start"], MEMORY_TOLERANCE[1] / MiB)
    grew = memory["end"] - memory["start"]
    fds, processes = series["fds"], series["processes"]
    return {
        "memory": "flat"
        if grew <= allowed_mib
        else f"grew {grew:.0f} MiB (> {allowed_mib:.0f} MiB allowed)",
        "fds": "flat"
        if fds["after"] <= fds["before"] + FD_TOLERANCE
        else f"{fds['after'] - fds['before']:.0f} descriptors left open after the soak",
        "processes": "flat"
        if processes["after"] <= processes["before"]
        else f"{processes['after'] - processes['before']:.0f} processes left after the soak",
    }


def soak(duration_s: float, in_flight: int, interval_s: float, pool_size: int) -> dict[str, Any]:
    """Run the soak and return its report (settings, samples, series, verdicts)."""
    sampler, stops = Sampler(interval_s), Counter()
    sampler.start()
    started = time.monotonic()
    try:
        asyncio.run(play(duration_s, in_flight, pool_size, sampler, stops))
    finally:
        sampler.stop()
    elapsed = time.monotonic() - started
    warmup_s = WARMUP_FRACTION * duration_s
    series = {
        name: summarize(sampler.samples, name, warmup_s)
        for name in ("pss_mib", "fds", "processes", "threads")
    }
    return {
        "settings": {
            "env": ENV_ID,
            "duration_s": duration_s,
            "in_flight": in_flight,
            "interval_s": interval_s,
            "sandbox_pool": pool_size,
            "warmup_s": warmup_s,
        },
        "episodes": sampler.episodes,
        "episodes_per_s": round(sampler.episodes / elapsed, 2),
        "outcomes": dict(stops),
        "series": series,
        "verdict": verdicts(series),
        "samples": [asdict(s) for s in sampler.samples],
    }


def render(report: dict[str, Any]) -> str:
    """The report as a short text table."""
    settings = report["settings"]
    lines = [
        f"soak: {settings['in_flight']} episodes in flight on {settings['env']} for "
        f"{settings['duration_s']:.0f} s (sandbox pool {settings['sandbox_pool']}): "
        f"{report['episodes']} episodes, {report['episodes_per_s']}/s, {report['outcomes']}",
        f"{'series':<10} {'before':>8} {'start':>8} {'end':>8} {'max':>8} {'/min':>8} {'after':>8}",
    ]
    for name, s in report["series"].items():
        lines.append(
            f"{name:<10} {s['before']:>8.0f} {s['start']:>8.0f} {s['end']:>8.0f} {s['max']:>8.0f} "
            f"{s['slope_per_min']:>8.2f} {s['after']:>8.0f}"
        )
    lines.append("verdict: " + ", ".join(f"{k} {v}" for k, v in report["verdict"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration-s", type=float, default=600.0, help="how long to load")
    parser.add_argument("--in-flight", type=int, default=256, help="concurrent episodes")
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--pool-size", type=int, default=os.cpu_count() or 1, help="sandboxes")
    parser.add_argument("--quick", action="store_true", help="64 in flight for 15 s, 1 s samples")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.in_flight, args.interval_s = 15.0, 64, 1.0
    report = soak(args.duration_s, args.in_flight, args.interval_s, args.pool_size)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0 if all(v == "flat" for v in report["verdict"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
