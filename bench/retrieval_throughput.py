"""Retrieval throughput: queries per second in-process vs over the HTTP retrieval server.

Builds a BM25 index of a generated encyclopedia (``--people`` sets its size), then runs
``--queries`` question texts as search queries (top ``--k``) with ``--concurrency`` in
flight, three ways: ``search_now`` in a plain loop (the floor: no threads, no sockets),
``BM25Retriever.search`` (what an env in the rollout's process awaits: a worker thread per
query), and ``HttpRetriever`` against ``palaestra search serve`` running in its own process
(what many rollout workers share). Prints queries/s, p50 and p99 latency, and each
way's throughput as a ratio of the in-process one. Checks that every way returns the same
documents.

    .venv/bin/python bench/retrieval_throughput.py --people 3000 --queries 2000 --concurrency 32

Numbers, not assertions: the machine decides them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from palaestra.envs.search import BM25Retriever, Document, Encyclopedia, HttpRetriever

Search = Callable[[str], Awaitable[list[Document]]]


async def measure(search: Search, queries: list[str], concurrency: int) -> dict:
    latencies: list[float] = []
    results: list[list[Document]] = [[] for _ in queries]
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            results[i] = await search(queries[i])
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(queries))))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "qps": len(queries) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "results": results,
    }


def start_server(index: Path) -> tuple[subprocess.Popen[str], str]:
    command = ["search", "serve", "--index", str(index), "--port", "0"]
    server = subprocess.Popen(
        [sys.executable, "-m", "palaestra", *command], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    return server, server.stdout.readline().split()[-1]  # "serving N documents on URL"


async def main(args: argparse.Namespace) -> None:
    world = Encyclopedia.generate(0, num_people=args.people, num_cities=args.people // 4)
    queries = [q.question for q in world.questions][: args.queries]
    started = time.perf_counter()
    retriever = BM25Retriever.build(world.documents)
    print(f"{len(world.documents)} documents indexed in {time.perf_counter() - started:.2f} s")
    print(f"{len(queries)} queries, top {args.k}, {args.concurrency} in flight\n")

    loop_started = time.perf_counter()
    floor = [retriever.search_now(q, args.k) for q in queries]
    floor_qps = len(queries) / (time.perf_counter() - loop_started)

    rows = {
        "in-process (thread per query)": await measure(
            lambda q: retriever.search(q, args.k), queries, args.concurrency
        )
    }
    with tempfile.TemporaryDirectory() as tmp:
        retriever.save(Path(tmp) / "index")
        server, url = start_server(Path(tmp) / "index")
        try:
            client = HttpRetriever(url, max_connections=args.concurrency)
            await client.search(queries[0], args.k)  # connect once before timing
            rows["HTTP server (own process)"] = await measure(
                lambda q: client.search(q, args.k), queries, args.concurrency
            )
            await client.aclose()
        finally:
            server.kill()
            server.wait()

    baseline = rows["in-process (thread per query)"]["qps"]
    print(f"{'way':32} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'vs in-process':>14}")
    print(
        f"{'search_now loop (floor)':32} {floor_qps:10.0f} {'':>8} {'':>8} {floor_qps / baseline:13.2f}x"
    )
    for name, row in rows.items():
        same = "" if row["results"] == floor else "  (RESULTS DIFFER)"
        print(
            f"{name:32} {row['qps']:10.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
            f"{row['qps'] / baseline:13.2f}x{same}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=3000, help="encyclopedia size (people)")
    parser.add_argument("--queries", type=int, default=2000, help="queries per way")
    parser.add_argument("--concurrency", type=int, default=32, help="queries in flight")
    parser.add_argument("--k", type=int, default=3, help="documents per query")
    asyncio.run(main(parser.parse_args()))
