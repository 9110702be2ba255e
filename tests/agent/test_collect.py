"""Collecting SFT data: oracle and model episodes round-trip through the SFT encoder to the
exact tokens and loss mask of the rollout; keep rules; the ``palaestra collect`` command."""

from __future__ import annotations

import json

import pytest

from palaestra.agent.collect import (
    ORACLE,
    CollectedEpisode,
    Keep,
    NoSolverError,
    collect,
    write_records,
)
from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EpisodeRequest, RolloutLimits, run_episode
from palaestra.agent.trajectory import Trajectory
from palaestra.cli import main
from palaestra.envs import make
from palaestra.trainer.data import ChatEncoder, read_sft

LOOKUP = "palaestra/ToolLookup-v0"
EOT = "<|im_end|>"


def reply(tokenizer, text: str) -> list[int]:
    """Ids a model would sample for ``text``, closing its turn."""
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(EOT)]


def assert_round_trip(tokenizer, episode: CollectedEpisode, trajectory: Trajectory) -> None:
    """The SFT encoding of the episode's record is the rollout's token sequence and mask."""
    encoded = ChatEncoder(tokenizer, max_length=8192).encode(episode.to_record()["messages"])
    assert not encoded.truncated and not trajectory.is_split
    assert encoded.ids == list(trajectory.token_ids)
    assert encoded.mask == list(trajectory.loss_mask)


@pytest.mark.parametrize("tool_format", ["hermes", "json"])
async def test_an_oracle_episode_encodes_to_the_tokens_the_rollout_produced(tokenizer, tool_format):
    renderer = ChatRenderer(tokenizer)
    env = make(LOOKUP, split="test", tool_format=tool_format)
    expert = FakeEngine(lambda prompt: reply(tokenizer, env.expert_action()))
    trajectory = await run_episode(
        env,
        expert,
        renderer,
        SamplingParams(),
        EpisodeRequest(0, reset_seed=7),
        env_id=LOOKUP,
        limits=RolloutLimits(max_turns=8),
    )
    collection = await collect(
        lambda: make(LOOKUP, split="test", tool_format=tool_format),
        ORACLE,
        renderer,
        env_id=LOOKUP,
        episodes=1,
        seed=7,
    )

    (episode,) = collection.kept
    assert (trajectory.reward, len(trajectory.turns)) == (1.0, 3)
    assert_round_trip(tokenizer, episode, trajectory)
    # 1 exactly on the expert's three messages and their end-of-turn tokens
    sampled = [m["content"] for m in episode.messages if m["role"] == "assistant"]
    assert trajectory.sampled_token_ids == [i for text in sampled for i in reply(tokenizer, text)]
    assert [m["role"] for m in episode.messages] == [
        "system",
        "user",
        "assistant",
        *["tool"] * (len(episode.messages) - 6),
        "assistant",
        "tool",
        "assistant",
    ]
    env.close()


async def test_model_episodes_collected_through_the_rollout_round_trip(tokenizer):
    made = []

    def make_env():
        made.append(make(LOOKUP, split="train"))
        return made[-1]

    # a "model" that writes what the expert would, on the one env in the pool
    engine = FakeEngine(lambda prompt: reply(tokenizer, made[-1].expert_action()))
    collection = await collect(
        make_env, engine, ChatRenderer(tokenizer), env_id=LOOKUP, episodes=3, concurrency=1
    )

    assert len(collection.kept) == 3 and collection.success_rate == 1.0
    for episode in collection.kept:
        assert episode.trajectory is not None and len(episode.trajectory.turns) == 3
        assert_round_trip(tokenizer, episode, episode.trajectory)
    assert len(engine.prompts) == 9


async def test_keep_success_drops_failed_episodes_and_keep_all_keeps_them(tokenizer):
    engine = FakeEngine(lambda prompt: reply(tokenizer, "\\boxed{many}"))

    def play(keep):
        return collect(
            lambda: make(LOOKUP, split="train"),
            engine,
            ChatRenderer(tokenizer),
            env_id=LOOKUP,
            episodes=2,
            keep=keep,
        )

    failed = await play(Keep.SUCCESS)
    assert (len(failed.episodes), failed.kept, failed.success_rate) == (2, [], 0.0)
    kept = (await play(Keep.ALL)).kept
    assert [(e.reward, e.success, e.stop_reason.value) for e in kept] == [
        (0.0, False, "answered")
    ] * 2
    assert "played 2 episodes, kept 0 (success)" in failed.summary()


async def test_search_oracle_records_read_back_as_sft_examples(tokenizer, tmp_path):
    env_id = "palaestra/Search-v0"
    collection = await collect(
        lambda: make(env_id, split="train"),
        ORACLE,
        ChatRenderer(tokenizer),
        env_id=env_id,
        episodes=8,
    )
    assert write_records(tmp_path / "search.jsonl", collection.kept) == 8
    examples = read_sft(tmp_path / "search.jsonl")
    first = json.loads((tmp_path / "search.jsonl").read_text().splitlines()[0])

    assert [e.messages for e in examples] == [e.messages for e in collection.kept]
    assert {"env_id", "task_id", "reward", "tools"} <= set(first) and first["reward"] == 1.0
    assert all(any(m["role"] == "tool" for m in e.messages) for e in examples)
    assert "<tool_call>" in examples[0].messages[0]["content"]  # the renderer's tool instructions


async def test_the_oracle_refuses_an_env_without_a_solver(tokenizer, math_tasks):
    with pytest.raises(NoSolverError, match=r"expert_action\(\).*envs/solver\.py"):
        await collect(
            lambda: make("palaestra/Math-v0", source=f"jsonl:{math_tasks}", test_fraction=0.25),
            ORACLE,
            ChatRenderer(tokenizer),
            env_id="palaestra/Math-v0",
            episodes=1,
        )


def test_the_collect_command_writes_records_that_read_sft_loads(tmp_path, capsys):
    out = tmp_path / "data" / "lookup.jsonl"
    argv = ["collect", "--env", LOOKUP, "--policy", "oracle", "--episodes", "5"]

    status = main([*argv, "--out", str(out), "--tokenizer", "tiny-random", "--seed", "3"])

    assert status == 0
    printed = capsys.readouterr().out
    assert "played 5 episodes, kept 5 (success), success rate 1.000" in printed
    assert f"wrote 5 SFT records to {out}" in printed
    assert len(read_sft(out)) == 5


def test_the_collect_command_names_the_missing_solver(tmp_path, capsys, math_tasks):
    kwargs = json.dumps({"source": f"jsonl:{math_tasks}", "test_fraction": 0.25})
    argv = ["collect", "--env", "palaestra/Math-v0", "--env-kwargs", kwargs, "--policy", "oracle"]

    status = main(
        [*argv, "--episodes", "1", "--out", str(tmp_path / "x.jsonl"), "--tokenizer", "tiny-random"]
    )

    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "has no scripted solver" in err and "expert_action()" in err and "envs/solver.py" in err
