"""Evaluation: pass@k and pass^k by hand, aggregation over episodes (every episode in the
denominator), the env's own turn limit, the cap to the split's size, and the table."""

import dataclasses
import re

import pytest

from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.errors import EngineError
from palaestra.agent.evaluate import (
    env_turn_limit,
    episode_records,
    evaluate,
    is_success,
    pass_at_k,
    pass_hat_k,
    results_table,
    summarize,
)
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, RolloutLimits
from palaestra.agent.trajectory import StopReason, Trajectory, Turn
from palaestra.envs import Task, ToolEnv, make
from palaestra.envs.core import TextEnv

EOT = "<|im_end|>"


def test_pass_at_k_by_hand():
    # 5 samples, 2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10.
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # only 2 wrong samples: any 3 include a correct one
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_pass_hat_k_by_hand():
    # 4 samples, 2 correct: of the C(4,2) = 6 pairs, C(2,2) = 1 is all correct.
    assert pass_hat_k(4, 2, 2) == pytest.approx(1 / 6)
    assert pass_hat_k(4, 2, 1) == pytest.approx(2 / 4)  # pass^1 = pass@1 = c/n
    assert pass_hat_k(4, 2, 3) == 0.0  # 3 all correct out of 2 correct: impossible
    assert pass_hat_k(4, 4, 4) == 1.0
    with pytest.raises(ValueError):
        pass_hat_k(4, 2, 5)


def episode(
    group: int, reward: float, stop=StopReason.ANSWERED, sampled: int = 2, turns: int = 1, **info
) -> Trajectory:
    return Trajectory(
        token_ids=(1,) * (3 + sampled),
        loss_mask=(0, 0, 0) + (1,) * sampled,
        logprobs=(0.0,) * (3 + sampled),
        turns=tuple(Turn(3, 3 + sampled, "x", "stop") for _ in range(turns)),
        reward=reward,
        reward_components={},
        stop_reason=stop,
        policy_version=0,
        group_id=group,
        env_id="e",
        task_id=str(group),
        info=info,
    )


def test_infrastructure_failures_count_as_failures_in_the_success_rate():
    # The requirement: the success rate counts every episode. An infrastructure
    # failure used to be left out of the denominator (1/4 here), which let a run whose
    # engine failed look better than one that ran; it is now a failure (1/5), reported
    # beside the rate in infra_failures.
    runs = [episode(0, 1.0), episode(0, 0.0), episode(1, 0.0), episode(1, 0.0)]
    runs.append(episode(1, 0.0, StopReason.ENGINE_ERROR, sampled=0, turns=0))
    result = summarize(runs, num_tasks=2, samples=2)
    assert result.accuracy == pytest.approx(1 / 5)
    assert result.pass_at[2] == pytest.approx(0.5)  # task 0 solved, task 1 not
    assert result.infra_failures == 1
    assert result.stop_reasons == {"answered": 4, "engine_error": 1}
    assert result.by_category == {}


def test_an_infrastructure_failure_is_never_a_success():
    crashed = episode(0, 1.0, StopReason.TOOL_ERROR, success=True)  # whatever it claims
    assert not is_success(crashed)


def test_pass_hat_turns_and_tool_calls_are_aggregated_per_episode():
    runs = [
        episode(0, 1.0, turns=2, tool_calls=1),
        episode(0, 1.0, turns=2, tool_calls=1),
        episode(1, 1.0, turns=2, tool_calls=1),
        episode(1, 0.0, stop=StopReason.MAX_TURNS, turns=3, tool_calls=3),
    ]
    result = summarize(runs, num_tasks=2, samples=2)
    assert result.pass_hat == {1: pytest.approx(3 / 4), 2: pytest.approx((1 + 0) / 2)}
    assert result.pass_at[2] == 1.0
    assert result.mean_turns == pytest.approx(9 / 4)
    assert result.mean_tool_calls == pytest.approx(6 / 4)
    assert result.success_by_turns == {2: 1.0, 3: 0.0}
    assert result.episodes_by_turns == {2: 3, 3: 1}
    # per-task success rates 1 and 1/2: standard error sqrt(var / n) = sqrt(0.125 / 2)
    assert result.accuracy_stderr == pytest.approx(0.25)


def test_accuracy_is_broken_down_by_category_when_tasks_carry_one():
    runs = [episode(0, 1.0), episode(1, 0.0), episode(2, 1.0)]
    runs = [
        Trajectory(**{**r.__dict__, "info": {"category": c}})
        for r, c in zip(runs, ["simple", "simple", "parallel"], strict=True)
    ]
    result = summarize(runs, num_tasks=3, samples=1)
    assert result.by_category == {"simple": 0.5, "parallel": 1.0}


def test_an_env_that_reports_success_is_believed_over_its_reward():
    solved, failed = episode(0, 0.0), episode(1, 1.0)  # rewards that say the opposite
    assert is_success(failed) and not is_success(solved)  # no report: a positive reward
    assert is_success(dataclasses.replace(solved, info={"success": True}))
    assert not is_success(dataclasses.replace(failed, info={"success": False}))


# ------------------------------------------------------------- evaluate() on a tool env


def double(n: int) -> int:
    """Twice a number.

    Args:
        n: The number.
    """
    return 2 * n


class DoubleEnv(ToolEnv):
    """Four tasks 'What is double of N?' that take two turns: a tool call, then the answer."""

    def __init__(self, split: str = "test", **options):
        tasks = [Task(f"double/{n}", f"What is double of {n}?", str(2 * n)) for n in range(1, 5)]
        super().__init__(tasks, tools=[double], split=split, max_turns=2, **options)

    def verify(self, task: Task, answer: str) -> float:
        return float(f"\\boxed{{{task.answer}}}" in answer)


def reply(tokenizer, text: str) -> list[int]:
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(EOT)]


def tool_agent(tokenizer, *, fail_on: int | None = None):
    """A scripted policy: call ``double`` on the first turn, answer on the second; the
    engine fails (an infrastructure failure) on the task about ``fail_on``."""

    def complete(prompt: list[int]) -> list[int]:
        text = tokenizer.decode(prompt)
        n = int(re.findall(r"double of (\d+)", text)[-1])
        if n == fail_on:
            raise EngineError("the server is down")
        if text.count("<|im_start|>assistant") == 1:
            return reply(
                tokenizer, f'<tool_call>{{"name": "double", "arguments": {{"n": {n}}}}}</tool_call>'
            )
        return reply(tokenizer, f"\\boxed{{{2 * n}}}")

    return FakeEngine(complete)


async def evaluate_double(tokenizer, engine, *, num_tasks=4, samples=1, max_turns=None):
    pool = EnvPool(DoubleEnv, 2)
    turns = env_turn_limit(pool.envs[0]) if max_turns is None else max_turns
    try:
        return await evaluate(
            pool,
            engine,
            ChatRenderer(tokenizer),
            SamplingParams(max_tokens=64),
            env_id="test/Double-v0",
            num_tasks=num_tasks,
            samples=samples,
            limits=RolloutLimits(max_turns=turns),
        )
    finally:
        pool.close()


def test_the_turn_limit_is_the_envs_own():
    assert env_turn_limit(DoubleEnv()) == 2
    assert env_turn_limit(make("palaestra/ToolLookup-v0", split="test")) == 8
    assert env_turn_limit(make("palaestra/ChainSum-v0", split="test", size=2)) == 1  # single-turn
    assert env_turn_limit(TextEnv()) is None  # says nothing: the caller decides


async def test_a_two_turn_env_succeeds_at_its_own_limit_and_fails_when_cut_to_one(tokenizer):
    result, _ = await evaluate_double(tokenizer, tool_agent(tokenizer))
    assert result.accuracy == 1.0 and result.mean_turns == 2.0 and result.mean_tool_calls == 1.0
    assert result.success_by_turns == {2: 1.0}

    cut, _ = await evaluate_double(tokenizer, tool_agent(tokenizer), max_turns=1)
    assert cut.accuracy == 0.0 and cut.stop_reasons == {"max_turns": 4}


async def test_engine_failures_stay_in_the_denominator(tokenizer):
    result, episodes = await evaluate_double(tokenizer, tool_agent(tokenizer, fail_on=3), samples=2)

    assert result.accuracy == pytest.approx(6 / 8)  # not 6/6: the failed task counts
    assert result.infra_failures == 2
    assert result.stop_reasons == {"answered": 6, "engine_error": 2}
    assert result.pass_at[2] == pytest.approx(3 / 4) and result.pass_hat[2] == pytest.approx(3 / 4)
    assert [(e.group_id, e.stop_reason) for e in episodes][4:6] == [
        (2, StopReason.ENGINE_ERROR)
    ] * 2


async def test_more_tasks_than_the_split_holds_are_capped_with_a_note(tokenizer):
    result, episodes = await evaluate_double(tokenizer, tool_agent(tokenizer), num_tasks=10)

    assert result.num_tasks == 4 and len(episodes) == 4
    assert result.infra_failures == 0 and result.accuracy == 1.0
    assert result.note is not None and "10 tasks" in result.note and "holds 4" in result.note
    assert "note: 10 tasks" in result.summary()


async def test_episode_records_and_the_table(tokenizer):
    result, episodes = await evaluate_double(tokenizer, tool_agent(tokenizer), samples=2)
    records = episode_records(episodes, tokenizer.decode)

    assert [(r["task_index"], r["sample"]) for r in records[:3]] == [(0, 0), (0, 1), (1, 0)]
    first = records[0]
    assert first["env_id"] == "test/Double-v0" and first["task_id"] == "double/1"
    assert (first["success"], first["stop_reason"], first["turns"], first["tool_calls"]) == (
        True,
        "answered",
        2,
        1,
    )
    assert "\\boxed{2}" in first["text"] and first["reward"] == 1.0

    table = results_table({"test/Double-v0": result}).splitlines()
    assert table[0].split()[:3] == ["env", "tasks", "x"] and "stop reasons" in table[0]
    assert table[1].split()[:5] == ["test/Double-v0", "4", "x", "2", "1.000"]
    assert table[1].endswith("answered 8")
