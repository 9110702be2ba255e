"""Component benchmarks: rollout concurrency with an I/O-bound env, math verifier speed.

- **rollout concurrency**: an env whose step sleeps (a tool call waiting on I/O) played
  with N episodes in flight against one at a time, through the real rollout code
  (``agent.rollout.generate_groups``) with a scripted engine, so only the env's waiting
  is measured. The ratio is what async rollouts buy when tools are slow.
- **math verifier**: answers judged per second by ``envs.verify.MathVerifier`` (the math
  env's judge), median and p99 latency, on a mix of plain numbers (judged on the fast
  path) and expressions that need math-verify.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.engines.fake import FakeEngine
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, RolloutLimits, generate_groups
from palaestra.envs.core import TextEnv
from palaestra.envs.verify import MathVerifier
from palaestra.models import load_tokenizer


class SlowToolEnv(TextEnv):
    """Two tool calls per episode, each waiting ``delay_s`` as a remote tool would."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[list, dict]:
        super().reset(seed=seed)
        self.calls = 0
        return [{"role": "user", "content": "Look it up."}], {"task_id": f"t{seed}"}

    def step(self, action: str) -> tuple[list, float, bool, bool, dict]:
        time.sleep(self.delay_s)
        self.calls += 1
        done = self.calls == 2
        return ([] if done else [{"role": "tool", "content": "42"}]), float(done), done, False, {}


async def _episodes_per_s(in_flight: int, episodes: int, delay_s: float) -> float:
    tokenizer = load_tokenizer("tiny-random")
    engine = FakeEngine(lambda prompt: [28, tokenizer.eos_token_id])
    pool = EnvPool(lambda: SlowToolEnv(delay_s), in_flight)
    requests = [[EpisodeRequest(group_id=i, reset_seed=i)] for i in range(episodes)]
    started = time.perf_counter()
    async for _ in generate_groups(
        pool,
        engine,
        ChatRenderer(tokenizer),
        SamplingParams(max_tokens=4),
        requests,
        env_id="slow",
        limits=RolloutLimits(max_turns=3),
    ):
        pass
    pool.close()
    return episodes / (time.perf_counter() - started)


def rollout_concurrency(
    in_flight: int = 16, episodes: int = 64, delay_s: float = 0.05
) -> dict[str, Any]:
    """Episodes per second with ``in_flight`` episodes at once against one at a time."""
    concurrent = asyncio.run(_episodes_per_s(in_flight, episodes, delay_s))
    serial = asyncio.run(_episodes_per_s(1, max(8, episodes // in_flight), delay_s))
    return {
        "env step sleep (s)": delay_s,
        "episodes in flight": in_flight,
        "episodes/s, concurrent": concurrent,
        "episodes/s, one at a time": serial,
        "ratio": concurrent / serial,
    }


ANSWERS = [
    ("The sum is \\boxed{42}.", "42"),
    ("\\boxed{-17}", "-17"),
    ("so \\boxed{3/4}", "0.75"),
    ("\\boxed{\\frac{1}{2}}", "1/2"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("x = \\boxed{x^2 + 2x + 1}", "(x+1)^2"),
    ("\\boxed{41}", "42"),
    ("no answer here", "7"),
]


def verifier_throughput(rounds: int = 25) -> dict[str, Any]:
    """Answers judged per second and per-answer latency (median, p99)."""
    latencies = []
    with MathVerifier() as verifier:
        verifier.verify("\\boxed{1}", "1")  # start the worker outside the timing
        started = time.perf_counter()
        for _ in range(rounds):
            for prediction, gold in ANSWERS:
                t = time.perf_counter()
                verifier.verify(prediction, gold)
                latencies.append(time.perf_counter() - t)
        total = time.perf_counter() - started
    latencies.sort()
    return {
        "answers": len(latencies),
        "answers/s": len(latencies) / total,
        "median latency (ms)": 1000 * statistics.median(latencies),
        "p99 latency (ms)": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }
