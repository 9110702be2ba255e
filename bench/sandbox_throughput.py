"""Sandbox throughput: executions per second and latency of each backend on one snippet.

Runs the same small Python program ``--runs`` times with ``--concurrency`` runs in flight,
on: a bare ``asyncio`` subprocess (no isolation, the floor), the ``local`` backend (rlimits,
temporary directory), ``bubblewrap``, and ``docker`` (a warm pool of containers, and cold:
a container created per run) when a Docker engine and the image are there. Prints runs/s,
p50 and p99 latency, and each backend's slowdown against the bare subprocess. Then grades
the 164 canonical HumanEval solutions through ``CodeEnv`` on each backend (``--humaneval``).

    .venv/bin/python bench/sandbox_throughput.py --runs 200 --concurrency 2 --humaneval

Numbers, not assertions: the machine decides them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from palaestra.sandboxes import Sandbox, SandboxError, SandboxPool, make_sandbox, run_python
from palaestra.sandboxes.bubblewrap import default_python

SNIPPET = "import json\nprint(json.dumps(sorted(range(1000))[:3]))\n"


async def bare_subprocess(python: str) -> None:
    process = await asyncio.create_subprocess_exec(
        python, "-c", SNIPPET, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await process.communicate()


async def measure(run: Callable[[], Awaitable[None]], runs: int, concurrency: int) -> dict:
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            started = time.perf_counter()
            await run()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(runs)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "runs_per_s": runs / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def sandbox_runner(sandbox: Sandbox) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        result = await run_python(sandbox, SNIPPET)
        assert result.ok, result.stderr

    return run


def cold_docker_runner() -> Callable[[], Awaitable[None]]:
    """A new container for every run: what the warm pool saves."""
    from palaestra.sandboxes.docker import DockerSandbox

    async def run() -> None:
        sandbox = DockerSandbox()
        try:
            result = await run_python(sandbox, SNIPPET)
            assert result.ok, result.stderr
        finally:
            await asyncio.to_thread(sandbox.close)

    return run


def backends(concurrency: int) -> dict[str, Sandbox]:
    python = default_python()  # every backend runs the same interpreter
    found: dict[str, Sandbox] = {"local": make_sandbox("local", unsafe_local=True, python=python)}
    for name in ("bubblewrap", "docker"):
        try:
            found[name] = SandboxPool(lambda name=name: make_sandbox(name), concurrency)
        except SandboxError as error:
            print(f"{name}: skipped ({error})")
    return found


async def humaneval(backend: str, concurrency: int) -> None:
    from palaestra.envs.humaneval import HumanEvalEnv, humaneval_tasks

    env = HumanEvalEnv(sandbox=backend, pool_size=concurrency)
    started = time.perf_counter()
    graded = await asyncio.gather(
        *(env.grader.grade(task, task.answer) for task in humaneval_tasks())
    )
    elapsed = time.perf_counter() - started
    passed = sum(reward == 1.0 for reward, _ in graded)
    print(f"HumanEval canonical solutions on {backend}: {passed}/164 in {elapsed:.1f} s")
    env.close()


async def main(args: argparse.Namespace) -> None:
    sandboxes = backends(args.concurrency)
    python = sandboxes["local"].python
    results = {
        "subprocess": await measure(lambda: bare_subprocess(python), args.runs, args.concurrency)
    }
    for name, sandbox in sandboxes.items():
        results[name] = await measure(sandbox_runner(sandbox), args.runs, args.concurrency)
        sandbox.close()
    if "docker" in sandboxes:
        cold_runs = max(args.runs // 10, 4)
        results["docker-cold"] = await measure(cold_docker_runner(), cold_runs, args.concurrency)
    floor = results["subprocess"]["runs_per_s"]
    print(f"{args.runs} runs, {args.concurrency} in flight:")
    for name, r in results.items():
        print(
            f"  {name:12s} {r['runs_per_s']:7.1f} runs/s  p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  slowdown x{floor / r['runs_per_s']:.2f}"
        )
    if args.humaneval:
        for backend in ("bubblewrap", "docker") if "docker" in sandboxes else ("bubblewrap",):
            await humaneval(backend, args.concurrency)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--humaneval", action="store_true")
    asyncio.run(main(parser.parse_args()))
