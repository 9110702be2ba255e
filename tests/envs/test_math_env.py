"""MathEnv: scripted episodes with known answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from palaestra.envs import (
    EnvConfigError,
    EnvError,
    MathEnv,
    MathVerifier,
    ReasoningGymSource,
    ResetNeededError,
    StepInfo,
    Task,
    VerifierError,
)


class FixedTasks:
    """A two-task source with known answers."""

    split = "train"
    tasks = (
        Task(task_id="half", question="What is 1/2 as a decimal?", answer="0.5"),
        Task(task_id="sum", question="What is 2 + 3?", answer="5"),
    )

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    with MathVerifier() as shared:
        yield shared


@pytest.fixture
def env(verifier: MathVerifier) -> Iterator[MathEnv]:
    env = MathEnv(FixedTasks(), format_reward=0.1, verifier=verifier)
    yield env
    env.close()


def _play(env: MathEnv, reply: str, task_index: int = 1) -> tuple[float, dict]:
    env.reset(options={"task_index": task_index})
    observation, reward, terminated, truncated, info = env.step(reply)
    assert (observation, terminated, truncated) == ([], True, False)
    return reward, info


def test_reset_returns_system_and_user_messages(env: MathEnv) -> None:
    messages, info = env.reset(options={"task_index": 1})

    assert [m["role"] for m in messages] == ["system", "user"]
    assert "\\boxed{}" in messages[0]["content"]
    assert messages[1]["content"].startswith("What is 2 + 3?")
    assert info == {"task_id": "sum", "answer": "5", "split": "train"}


def test_correct_boxed_answer_earns_correct_and_format(env: MathEnv) -> None:
    reward, info = _play(env, r"2 + 3 = 5, so the answer is \boxed{5}.")

    assert reward == pytest.approx(1.1)
    assert info["reward_components"] == {
        "correct": 1.0,
        "format": pytest.approx(0.1),
        "reward_hack": 0.0,
    }
    assert info["extracted_answer"] == "5"
    assert info["verify_timed_out"] is False


def test_equivalent_form_counts_as_correct(env: MathEnv) -> None:
    reward, info = _play(env, r"\boxed{\frac{1}{2}}", task_index=0)

    assert info["reward_components"]["correct"] == 1.0
    assert reward == pytest.approx(1.1)


def test_wrong_boxed_answer_earns_only_format(env: MathEnv) -> None:
    reward, info = _play(env, r"\boxed{6}")

    assert reward == pytest.approx(0.1)
    assert info["reward_components"] == {
        "correct": 0.0,
        "format": pytest.approx(0.1),
        "reward_hack": 0.0,
    }


def test_empty_box_earns_no_format_reward(env: MathEnv) -> None:
    reward, info = _play(env, r"The answer is \boxed{}.")

    assert reward == 0.0
    assert info["reward_components"] == {"correct": 0.0, "format": 0.0, "reward_hack": 0.0}


def test_unboxed_answer_uses_the_fallback_without_format_reward(env: MathEnv) -> None:
    reward, info = _play(env, "2 + 3 is 5")

    assert reward == 1.0
    assert info["reward_components"] == {"correct": 1.0, "format": 0.0, "reward_hack": 0.0}


def test_missing_answer_scores_zero(env: MathEnv) -> None:
    reward, info = _play(env, "I do not know.")

    assert reward == 0.0
    assert info["extracted_answer"] is None


def test_no_fallback_means_unboxed_answers_score_zero(verifier: MathVerifier) -> None:
    env = MathEnv(FixedTasks(), answer_fallback="none", verifier=verifier)

    reward, info = _play(env, "2 + 3 is 5")

    assert reward == 0.0 and info["extracted_answer"] is None


@pytest.mark.parametrize(
    "reply",
    [
        r"It is \boxed{5}, or maybe \boxed{6}.",
        r"\boxed{6}? No: \boxed{5}.",  # a right last box does not help
        r"\boxed{4}, then \boxed{5} and \boxed{5}",
    ],
)
def test_a_reply_whose_boxes_disagree_scores_zero_and_is_named(env: MathEnv, reply: str) -> None:
    reward, info = _play(env, reply)

    assert reward == 0.0
    assert info["reward_components"] == {"correct": 0.0, "format": 0.0, "reward_hack": 1.0}
    assert info["reward_hack"] == ["hedge"]
    assert StepInfo.from_info(info).reward_hack == ("hedge",)


@pytest.mark.parametrize(
    "reply",
    [
        r"\boxed{1/2}, that is \boxed{0.5}",
        r"\boxed{0.5}. Again: \boxed{0.5}",
        r"Format: \boxed{}. Answer: \boxed{\frac{1}{2}}",  # an empty box is no answer
    ],
)
def test_one_answer_boxed_several_times_is_not_a_hedge(env: MathEnv, reply: str) -> None:
    reward, info = _play(env, reply, task_index=0)

    assert reward == pytest.approx(1.1)
    assert info["reward_components"]["reward_hack"] == 0.0
    assert "reward_hack" not in info


def test_hedge_last_grades_the_last_box_alone(verifier: MathVerifier) -> None:
    env = MathEnv(FixedTasks(), format_reward=0.1, hedge="last", verifier=verifier)

    reward, info = _play(env, r"It is \boxed{6}, or maybe \boxed{5}.")

    assert reward == pytest.approx(1.1)
    assert info["reward_components"] == {"correct": 1.0, "format": pytest.approx(0.1)}
    assert "reward_hack" not in info


def test_step_before_reset_and_after_the_end_raises(env: MathEnv) -> None:
    with pytest.raises(ResetNeededError, match="call reset\\(\\) first"):
        env.step(r"\boxed{5}")
    _play(env, r"\boxed{5}")
    with pytest.raises(ResetNeededError):
        env.step(r"\boxed{5}")


def test_envs_share_one_verifier_until_the_last_closes() -> None:
    first, second = (
        MathEnv(FixedTasks(), verify_timeout=1.5),
        MathEnv(FixedTasks(), verify_timeout=1.5),
    )
    assert first.verifier is second.verifier

    first.close()
    first.close()
    assert _play(second, r"\boxed{\sqrt{25}}")[0] == 1.0  # needs the worker process
    second.close()

    with pytest.raises(VerifierError, match="closed"):
        second.verifier.verify(r"\sqrt{4}", "2")
    third = MathEnv(FixedTasks(), verify_timeout=1.5)
    assert third.verifier is not second.verifier
    third.close()


def test_reset_seed_picks_the_task_deterministically() -> None:
    env = MathEnv("reasoning_gym:chain_sum", size=500)

    first = [env.reset(seed=seed)[1]["task_id"] for seed in range(5)]
    again = [env.reset(seed=seed)[1]["task_id"] for seed in range(5)]

    assert first == again and len(set(first)) > 1
    assert env.num_tasks == 500
    env.close()
    env.close()


def test_prompt_options(verifier: MathVerifier) -> None:
    env = MathEnv(
        FixedTasks(), system_prompt=None, prompt_template="Q: {question}\nA:", verifier=verifier
    )

    messages, _ = env.reset(options={"task_index": 1})

    assert messages == [{"role": "user", "content": "Q: What is 2 + 3?\nA:"}]


def test_test_split_from_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(50))
    )
    env = MathEnv(f"jsonl:{path}", split="test", test_fraction=0.3)

    _, info = env.reset(seed=0)

    assert info["split"] == "test"
    assert 0 < env.num_tasks < 50
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_template": "no placeholder"}, "must contain '{question}'"),
        ({"prompt_template": "{question} in \\boxed{}"}, "write literal braces doubled"),
        ({"answer_fallback": "first_number"}, "answer fallback must be one of"),
        ({"hedge": "first"}, "hedge must be one of 'zero', 'last'"),
        ({"split": "valid"}, "split must be 'train' or 'test'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(EnvError, match=message):
        MathEnv(FixedTasks(), **kwargs)


def test_prebuilt_source_must_match_split_and_take_no_options() -> None:
    test_source = ReasoningGymSource("chain_sum", "test", size=5)
    with pytest.raises(EnvConfigError, match="Pass split='test'"):
        MathEnv(test_source)
    with pytest.raises(EnvConfigError, match="only apply to a source spec"):
        MathEnv(test_source, split="test", size=3)


def test_task_index_out_of_range_is_named(env: MathEnv) -> None:
    with pytest.raises(EnvConfigError, match=r"in \[0, 2\)"):
        env.reset(options={"task_index": 2})


async def test_astep_scores_in_a_worker_thread(env: MathEnv) -> None:
    await env.areset(options={"task_index": 0})

    _, reward, terminated, _, info = await env.astep(r"\boxed{1/2}")

    assert reward == pytest.approx(1.1) and terminated
    assert info["task_id"] == "half"
