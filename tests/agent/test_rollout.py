"""Rollouts: token-in/token-out layout, loss masks, multi-turn continuation, failures."""

from __future__ import annotations

from typing import Any

import pytest

from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.errors import TemplateDriftError
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EnvPool, EpisodeRequest, generate_groups, run_episode
from palaestra.agent.trajectory import StopReason
from palaestra.envs import make
from palaestra.envs.core import TextEnv

EOT = "<|im_end|>"


def math_env(path):
    return make("palaestra/Math-v0", source=f"jsonl:{path}", test_fraction=0.25)


def reply(tokenizer, text: str) -> list[int]:
    """Ids a model would sample for ``text``, closing its turn."""
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(EOT)]


async def test_trained_tokens_are_exactly_the_sampled_tokens(tokenizer, math_tasks):
    env = math_env(math_tasks)
    obs, info = env.reset(seed=3)
    answer = info["answer"]
    sampled = reply(tokenizer, f"The answer is \\boxed{{{answer}}}")
    engine = FakeEngine(lambda prompt: sampled, logprobs=-0.5)
    renderer = ChatRenderer(tokenizer)

    t = await run_episode(env, engine, renderer, SamplingParams(), EpisodeRequest(0, 3), env_id="m")

    prompt = renderer.prompt_ids(obs)
    assert engine.prompts == [prompt]
    assert list(t.token_ids) == prompt + sampled
    assert t.sampled_token_ids == sampled
    assert list(t.loss_mask) == [0] * len(prompt) + [1] * len(sampled)
    assert list(t.logprobs) == [0.0] * len(prompt) + [-0.5] * len(sampled)
    assert t.reward == 1.0 and t.stop_reason is StopReason.ANSWERED
    assert t.turns[0].start == len(prompt) and t.turns[0].end == len(t.token_ids)
    env.close()


async def test_truncated_completion_is_marked_max_tokens(tokenizer, math_tasks):
    env = math_env(math_tasks)
    engine = FakeEngine(lambda prompt: tokenizer.encode("one two three four five six"))
    t = await run_episode(
        env,
        engine,
        ChatRenderer(tokenizer),
        SamplingParams(max_tokens=3),
        EpisodeRequest(0, 0),
        env_id="m",
    )
    assert t.num_sampled_tokens == 3
    assert t.stop_reason is StopReason.MAX_TOKENS
    env.close()


class FollowUpEnv(TextEnv):
    """Asks a question, then one follow-up; rewards the second answer if it says 'yes'."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return [{"role": "user", "content": "Say hi."}], {"task_id": "follow-up"}

    def step(self, action: str) -> tuple[Any, float, bool, bool, dict]:
        self.turn += 1
        if self.turn == 1:
            return [{"role": "user", "content": "Are you sure?"}], 0.0, False, False, {}
        reward = float("yes" in action)
        return [], reward, True, False, {"reward_components": {"yes": reward}}


async def test_multi_turn_sequence_equals_the_template_rendering(tokenizer):
    first, second = reply(tokenizer, "hi"), reply(tokenizer, "yes")
    engine = FakeEngine([first, second])
    renderer = ChatRenderer(tokenizer)

    t = await run_episode(
        FollowUpEnv(),
        engine,
        renderer,
        SamplingParams(),
        EpisodeRequest(0, 0),
        env_id="f",
        max_turns=4,
    )

    conversation = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "yes"},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    # The template closes the last turn with a newline the model never samples.
    assert tokenizer.decode(list(t.token_ids)) + "\n" == rendered
    assert t.sampled_token_ids == first + second
    assert [t.token_ids[turn.start : turn.end] for turn in t.turns] == [tuple(first), tuple(second)]
    assert engine.prompts[1] == list(t.token_ids[: t.turns[1].start])
    assert t.reward == 1.0 and t.reward_components == {"yes": 1.0}


async def test_history_rewriting_template_raises_drift(tokenizer):
    drifting = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    # A template that drops earlier assistant turns, like ones that strip reasoning.
    drifting.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    engine = FakeEngine([reply(tokenizer, "hi"), reply(tokenizer, "yes")])
    with pytest.raises(TemplateDriftError):
        await run_episode(
            FollowUpEnv(),
            engine,
            ChatRenderer(drifting),
            SamplingParams(),
            EpisodeRequest(0, 0),
            env_id="f",
            max_turns=4,
        )


class BrokenEngine(FakeEngine):
    async def generate(self, prompt_ids, sampling):
        raise ConnectionError("engine went away")


class CrashingEnv(FollowUpEnv):
    def step(self, action):
        raise RuntimeError("tool backend down")


async def test_infrastructure_failures_are_marked_not_scored(tokenizer, math_tasks):
    renderer = ChatRenderer(tokenizer)
    env = math_env(math_tasks)
    t = await run_episode(
        env, BrokenEngine([]), renderer, SamplingParams(), EpisodeRequest(0, 0), env_id="m"
    )
    assert t.stop_reason is StopReason.ENGINE_ERROR and t.stop_reason.is_infra_failure
    assert "engine went away" in t.info["error"] and t.num_sampled_tokens == 0

    t = await run_episode(
        CrashingEnv(),
        FakeEngine([reply(tokenizer, "hi")]),
        renderer,
        SamplingParams(),
        EpisodeRequest(0, 0),
        env_id="c",
    )
    assert t.stop_reason is StopReason.ENV_ERROR and "tool backend down" in t.info["error"]
    env.close()


async def test_groups_share_a_task_and_arrive_complete(tokenizer, math_tasks):
    pool = EnvPool(lambda: math_env(math_tasks), size=5)
    engine = FakeEngine(lambda prompt: reply(tokenizer, "\\boxed{2}"))
    groups = [
        [EpisodeRequest(g, reset_seed=100 + g, sampling_seed=j) for j in range(4)] for g in range(3)
    ]
    seen = [
        g
        async for g in generate_groups(
            pool, engine, ChatRenderer(tokenizer), SamplingParams(), groups, env_id="m"
        )
    ]
    assert sorted(len(g) for g in seen) == [4, 4, 4]
    for group in seen:
        assert len({t.task_id for t in group}) == 1
        assert len({t.group_id for t in group}) == 1
    assert len({g[0].task_id for g in seen}) > 1
    pool.close()


async def test_tool_episode_keeps_tool_results_out_of_the_loss(tokenizer):
    """A scripted agent calls ``lookup``, reads the result, then answers (two sampled turns)."""
    env = make("palaestra/ToolLookup-v0", split="train")
    env.reset(seed=7)  # the same seed run_episode uses: learn the task to script the agent
    task = env.unwrapped.task
    item = next(iter(task.metadata["catalog"]))
    args = f'{{"item": "{item}", "field": "price"}}'
    call = f'<tool_call>{{"name": "lookup", "arguments": {args}}}</tool_call>'
    turns = [reply(tokenizer, call), reply(tokenizer, f"\\boxed{{{task.answer}}}")]
    engine = FakeEngine(turns)
    renderer = ChatRenderer(tokenizer)

    t = await run_episode(
        env, engine, renderer, SamplingParams(), EpisodeRequest(0, 7), env_id="tl", max_turns=8
    )

    assert [list(t.token_ids[turn.start : turn.end]) for turn in t.turns] == turns
    assert t.sampled_token_ids == turns[0] + turns[1]
    between = t.token_ids[t.turns[0].end : t.turns[1].start]
    assert between and all(m == 0 for m in t.loss_mask[t.turns[0].end : t.turns[1].start])
    tool_text = tokenizer.decode(list(between))  # the tool's answer, as env tokens
    assert str(task.metadata["catalog"][item]["price"]) in tool_text and "Error" not in tool_text
    assert engine.prompts[1] == list(t.token_ids[: t.turns[1].start])
    assert t.reward == 1.0 and t.stop_reason is StopReason.ANSWERED
    env.close()
