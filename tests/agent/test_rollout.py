"""Rollouts: token-in/token-out layout, loss masks, multi-turn continuation and splits,
per-turn rewards, stop reasons, limits, tool descriptions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.errors import RolloutConfigError
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import (
    EnvPool,
    EpisodeRequest,
    RolloutLimits,
    episode_metrics,
    generate_groups,
    run_episode,
)
from palaestra.agent.trajectory import StopReason, Trajectory
from palaestra.envs import Task, ToolEnv, ToolInfraError, make
from palaestra.envs.core import TextEnv

EOT = "<|im_end|>"


def math_env(path):
    return make("palaestra/Math-v0", source=f"jsonl:{path}", test_fraction=0.25)


async def play(env, engine, renderer, *, sampling=None, seed=0, **limits) -> Trajectory:
    """``run_episode`` of group 0 with reset seed ``seed``, within ``RolloutLimits(**limits)``."""
    sampling = sampling or SamplingParams()
    request = EpisodeRequest(0, seed)
    return await run_episode(
        env, engine, renderer, sampling, request, env_id="test", limits=RolloutLimits(**limits)
    )


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
    t = await play(env, engine, ChatRenderer(tokenizer), sampling=SamplingParams(max_tokens=3))
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

    t = await play(FollowUpEnv(), engine, renderer, max_turns=4)

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


class ChatEnv(TextEnv):
    """A user who asks, then sends the scripted follow-ups one per reply; each reply earns
    its scripted reward, and the reply to the last follow-up ends the episode."""

    def __init__(self, followups: list[str], rewards: list[float]) -> None:
        self.followups, self.rewards = followups, rewards

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return [{"role": "user", "content": "Say hi."}], {"task_id": "chat"}

    def step(self, action: str) -> tuple[Any, float, bool, bool, dict]:
        reward = self.rewards[self.turn]
        self.turn += 1
        info = {"reward_components": {"reply": reward}}
        if self.turn > len(self.followups):
            return [], reward, True, False, info
        return (
            [{"role": "user", "content": self.followups[self.turn - 1]}],
            reward,
            False,
            False,
            info,
        )


REASONING_STRIPPING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Like Qwen3's: earlier assistant turns lose their ``<think>`` reasoning."""


def with_template(tokenizer, template: str):
    other = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other.chat_template = template
    return other


def position_logprobs(prompt: list[int], completion: list[int]) -> list[float]:
    """A distinct logprob per (prompt length, position), to check alignment."""
    return [-0.001 * (len(prompt) + j) for j in range(len(completion))]


def assert_exact(t, engine, scripted: list[list[int]]) -> None:
    """Every mask-1 token is a sampled token at its place, with its logprob; every turn was
    prompted with exactly the tokens of its sample that precede it."""
    assert [list(t.token_ids[turn.start : turn.end]) for turn in t.turns] == scripted
    sampled_positions = {i for turn in t.turns for i in range(turn.start, turn.end)}
    assert {i for i, m in enumerate(t.loss_mask) if m} == sampled_positions
    for k, turn in enumerate(t.turns):
        sample_start = max(s for s in t.segment_starts if s <= turn.start)
        assert engine.prompts[k] == list(t.token_ids[sample_start : turn.start])
        expected = position_logprobs(engine.prompts[k], scripted[k])
        assert list(t.logprobs[turn.start : turn.end]) == expected
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask, strict=True) if not m)


async def test_a_history_rewriting_template_splits_the_episode(tokenizer):
    stripping = with_template(tokenizer, REASONING_STRIPPING)
    renderer = ChatRenderer(stripping)
    scripted = [
        reply(tokenizer, "<think>a greeting</think>hi"),  # its reasoning vanishes from history
        reply(tokenizer, "sure"),  # nothing to strip: the next turn extends this sample
        reply(tokenizer, "yes"),
    ]
    engine = FakeEngine(scripted, logprobs=position_logprobs)
    env = ChatEnv(["Are you sure?", "Really?"], [0.0, 0.0, 1.0])

    t = await play(env, engine, renderer, max_turns=4)

    assert t.is_split and t.stop_reason is StopReason.ANSWERED and t.reward == 1.0
    assert t.segment_starts == (0, t.turns[0].end)
    assert_exact(t, engine, scripted)
    first, second = (list(t.token_ids[a:b]) for a, b in t.segments)
    assert first == renderer.prompt_ids([{"role": "user", "content": "Say hi."}]) + scripted[0]
    conversation = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "<think>a greeting</think>hi"},
        {"role": "user", "content": "Are you sure?"},
    ]
    new_prompt = renderer.prompt_ids(conversation)
    assert second[: len(new_prompt)] == new_prompt  # the whole conversation, rendered afresh
    assert "a greeting" not in stripping.decode(new_prompt)
    assert all(m == 0 for m in t.loss_mask[t.segment_starts[1] : t.turns[1].start])


async def test_a_template_that_keeps_history_does_not_split(tokenizer):
    scripted = [reply(tokenizer, "<think>a greeting</think>hi"), reply(tokenizer, "yes")]
    engine = FakeEngine(scripted, logprobs=position_logprobs)

    t = await play(
        ChatEnv(["Are you sure?"], [0.0, 1.0]), engine, ChatRenderer(tokenizer), max_turns=4
    )

    assert not t.is_split and t.segment_starts == (0,) and t.segments == [(0, len(t.token_ids))]
    assert_exact(t, engine, scripted)


async def test_each_turn_keeps_its_step_reward(tokenizer):
    scripted = [reply(tokenizer, "hi"), reply(tokenizer, "sure"), reply(tokenizer, "yes")]
    env = ChatEnv(["Are you sure?", "Really?"], [0.25, 0.0, 1.0])

    t = await play(env, FakeEngine(scripted), ChatRenderer(tokenizer), max_turns=4)

    assert [turn.reward for turn in t.turns] == [0.25, 0.0, 1.0]
    assert t.reward == 1.25 and t.reward_components == {"reply": 1.25}
    to_go = t.returns_to_go()
    for turn, expected in zip(t.turns, [1.25, 1.0, 1.0], strict=True):
        assert set(to_go[turn.start : turn.end]) == {expected}
    assert all(g == 0.0 for g, m in zip(to_go, t.loss_mask, strict=True) if not m)


class BrokenEngine(FakeEngine):
    async def generate(self, prompt_ids, sampling):
        raise ConnectionError("engine went away")


class CrashingEnv(FollowUpEnv):
    def step(self, action):
        raise RuntimeError("tool backend down")


async def test_infrastructure_failures_are_marked_not_scored(tokenizer, math_tasks):
    renderer = ChatRenderer(tokenizer)
    env = math_env(math_tasks)
    t = await play(env, BrokenEngine([]), renderer)
    assert t.stop_reason is StopReason.ENGINE_ERROR and t.stop_reason.is_infra_failure
    assert "engine went away" in t.info["error"] and t.num_sampled_tokens == 0

    t = await play(CrashingEnv(), FakeEngine([reply(tokenizer, "hi")]), renderer)
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

    t = await play(env, engine, renderer, seed=7, max_turns=8)

    assert [list(t.token_ids[turn.start : turn.end]) for turn in t.turns] == turns
    assert t.sampled_token_ids == turns[0] + turns[1]
    between = t.token_ids[t.turns[0].end : t.turns[1].start]
    assert between and all(m == 0 for m in t.loss_mask[t.turns[0].end : t.turns[1].start])
    tool_text = tokenizer.decode(list(between))  # the tool's answer, as env tokens
    assert str(task.metadata["catalog"][item]["price"]) in tool_text and "Error" not in tool_text
    assert engine.prompts[1] == list(t.token_ids[: t.turns[1].start])
    assert t.reward == 1.0 and t.stop_reason is StopReason.ANSWERED
    env.close()


# --------------------------------------------------------------------------- stop reasons


def lookup_call(tokenizer, body: str) -> list[int]:
    return reply(tokenizer, f"<tool_call>{body}</tool_call>")


async def play_tool_lookup(tokenizer, scripted, **limits):
    env = make("palaestra/ToolLookup-v0", split="train")
    try:
        return await play(env, FakeEngine(scripted), ChatRenderer(tokenizer), seed=7, **limits)
    finally:
        env.close()


async def test_an_episode_ending_on_a_malformed_call_is_a_parse_error(tokenizer):
    good = lookup_call(tokenizer, '{"name": "calculator", "arguments": {"expression": "1+1"}}')
    unreadable = lookup_call(tokenizer, "{not json")
    unknown = lookup_call(tokenizer, '{"name": "search", "arguments": {}}')

    for scripted in ([unreadable], [good, unknown]):
        t = await play_tool_lookup(tokenizer, scripted, max_turns=len(scripted))
        assert t.stop_reason is StopReason.PARSE_ERROR and not t.stop_reason.is_infra_failure

    t = await play_tool_lookup(tokenizer, [unreadable, good], max_turns=2)
    assert t.stop_reason is StopReason.MAX_TURNS  # the last call was well formed
    assert (t.info["parse_errors"], t.info["tool_calls"]) == (1, 1)


class FragileToolEnv(ToolEnv):
    """One tool, whose backend is down."""

    def __init__(self) -> None:
        def inventory(item: str) -> int:
            """Units of an item in stock."""
            raise ToolInfraError("inventory service unreachable")

        super().__init__([Task("t0", "How many lamps?", "3")], [inventory])

    def verify(self, task: Task, answer: str) -> float:
        return float(answer == task.answer)


async def test_a_tool_infrastructure_failure_is_a_tool_error(tokenizer):
    call = lookup_call(tokenizer, '{"name": "inventory", "arguments": {"item": "lamp"}}')

    t = await play(FragileToolEnv(), FakeEngine([call]), ChatRenderer(tokenizer), max_turns=4)

    assert t.stop_reason is StopReason.TOOL_ERROR and t.stop_reason.is_infra_failure
    assert t.info["error"] == "inventory service unreachable" and len(t.turns) == 1
    assert "stop_reason" not in t.info  # recorded as the trajectory's stop reason


async def test_a_completion_cut_at_its_token_limit_ends_as_max_tokens(tokenizer):
    env = ChatEnv([], [0.0])
    engine = FakeEngine([tokenizer.encode("one two three four five six")])

    t = await play(env, engine, ChatRenderer(tokenizer), sampling=SamplingParams(max_tokens=3))

    assert t.stop_reason is StopReason.MAX_TOKENS and t.turns[0].finish_reason == "length"


class ReportingEnv(ChatEnv):
    def step(self, action):
        observation, reward, terminated, truncated, info = super().step(action)
        return observation, reward, terminated, truncated, {**info, "stop_reason": "gave_up"}


class UnstartableEnv(ChatEnv):
    def reset(self, *, seed=None, options=None):
        raise ConnectionError("no task server")


class BrokenInfoEnv(ChatEnv):
    def step(self, action):
        observation, reward, terminated, truncated, info = super().step(action)
        return observation, reward, terminated, truncated, {**info, "success": "yes"}


async def test_env_failures_outside_steps_are_env_errors(tokenizer):
    renderer = ChatRenderer(tokenizer)
    engine = FakeEngine([reply(tokenizer, "hi")])
    t = await play(ReportingEnv([], [1.0]), engine, renderer)
    assert t.stop_reason is StopReason.ENV_ERROR and "'gave_up'" in t.info["error"]

    t = await play(BrokenInfoEnv([], [1.0]), FakeEngine([reply(tokenizer, "hi")]), renderer)
    assert t.stop_reason is StopReason.ENV_ERROR
    assert "test (BrokenInfoEnv) returned info['success'] = 'yes'" in t.info["error"]

    t = await play(UnstartableEnv([], [1.0]), engine, renderer, seed=5)
    assert t.stop_reason is StopReason.ENV_ERROR and "no task server" in t.info["error"]
    assert t.token_ids == () and t.task_id == "5"


# -------------------------------------------------------------------------------- limits


def test_limits_out_of_range_are_refused():
    for bad in ({"max_turns": 0}, {"max_total_tokens": 0}, {"max_episode_s": 0.0}):
        with pytest.raises(RolloutConfigError):
            RolloutLimits(**bad)


async def test_max_total_tokens_caps_each_turn_and_ends_the_episode(tokenizer):
    renderer = ChatRenderer(tokenizer)
    first, second = reply(tokenizer, "hi"), reply(tokenizer, "yes, I am quite sure of it")
    unlimited = await play(
        ChatEnv(["Are you sure?"], [0.0, 1.0]), FakeEngine([first, second]), renderer, max_turns=2
    )
    second_prompt = unlimited.turns[1].start

    # room for 3 tokens of the second reply: it is cut there
    engine = FakeEngine([first, second])
    t = await play(
        ChatEnv(["Are you sure?"], [0.0, 1.0]),
        engine,
        renderer,
        sampling=SamplingParams(max_tokens=50),
        max_turns=2,
        max_total_tokens=second_prompt + 3,
    )
    first_prompt = t.turns[0].start
    assert [s.max_tokens for s in engine.sampling] == [second_prompt + 3 - first_prompt, 3]
    assert len(t.token_ids) == second_prompt + 3 and t.stop_reason is StopReason.MAX_TOKENS

    # no room after the follow-up: the episode stops before it
    t = await play(
        ChatEnv(["Are you sure?"], [0.0, 1.0]),
        FakeEngine([first, second]),
        renderer,
        max_turns=2,
        max_total_tokens=second_prompt,
    )
    assert len(t.turns) == 1 and t.stop_reason is StopReason.MAX_TOKENS
    assert len(t.token_ids) == unlimited.turns[0].end

    # not even room for the first prompt
    t = await play(ChatEnv([], [1.0]), FakeEngine([first]), renderer, max_total_tokens=4)
    assert t.turns == () and t.stop_reason is StopReason.MAX_TOKENS


class HangingEngine(FakeEngine):
    async def generate(self, prompt_ids, sampling):
        await asyncio.Event().wait()  # never set: only the episode's time limit ends this


class SlowEnv(ChatEnv):
    def step(self, action):
        time.sleep(0.05)
        return super().step(action)


async def test_max_episode_s_ends_the_episode_as_a_timeout(tokenizer):
    renderer = ChatRenderer(tokenizer)
    t = await play(ChatEnv([], [1.0]), HangingEngine([]), renderer, max_episode_s=0.02)
    assert t.stop_reason is StopReason.TIMEOUT and t.stop_reason.is_infra_failure
    assert "max_episode_s=0.02" in t.info["error"] and t.turns == ()

    # an env step is not interrupted: the episode stops after it
    t = await play(
        SlowEnv(["Are you sure?"], [0.5, 1.0]),
        FakeEngine([reply(tokenizer, "hi"), reply(tokenizer, "yes")]),
        renderer,
        max_turns=2,
        max_episode_s=0.01,
    )
    assert t.stop_reason is StopReason.TIMEOUT and [turn.reward for turn in t.turns] == [0.5]


async def test_generate_groups_applies_the_limits_to_every_episode(tokenizer):
    pool = EnvPool(lambda: ChatEnv([], [1.0]), size=2)
    engine = FakeEngine(lambda prompt: reply(tokenizer, "a long reply of several tokens"))
    groups = [[EpisodeRequest(g, reset_seed=g) for _ in range(2)] for g in range(2)]
    prompt = ChatRenderer(tokenizer).prompt_ids([{"role": "user", "content": "Say hi."}])

    seen = [
        t
        async for group in generate_groups(
            pool,
            engine,
            ChatRenderer(tokenizer),
            SamplingParams(),
            groups,
            env_id="c",
            limits=RolloutLimits(max_total_tokens=len(prompt) + 2, max_episode_s=60.0),
        )
        for t in group
    ]

    assert [t.num_sampled_tokens for t in seen] == [2, 2, 2, 2]
    assert {t.stop_reason for t in seen} == {StopReason.MAX_TOKENS}
    pool.close()


# ------------------------------------------------------------------------------- metrics


async def test_episode_metrics_count_stop_reasons_splits_and_tool_counters(tokenizer):
    unreadable = lookup_call(tokenizer, "{not json")
    parse_error = await play_tool_lookup(tokenizer, [unreadable])
    split = await play(
        ChatEnv(["Are you sure?"], [0.0, 1.0]),
        FakeEngine([reply(tokenizer, "<think>x</think>hi"), reply(tokenizer, "yes")]),
        ChatRenderer(with_template(tokenizer, REASONING_STRIPPING)),
        max_turns=2,
    )

    metrics = episode_metrics([parse_error, split])

    assert metrics["stop/parse_error"] == 1 and metrics["stop/answered"] == 1
    assert metrics["stop/timeout"] == 0 and len([k for k in metrics if k.startswith("stop/")]) == 8
    assert metrics["episodes_split"] == 1
    assert metrics["tools/parse_errors"] == 1 and metrics["tools/tool_calls"] == 0


async def test_each_turn_records_the_policy_version_that_sampled_it(tokenizer):
    """A weight sync lands between two turns: the episode keeps both versions."""
    engine = FakeEngine([reply(tokenizer, "hi"), reply(tokenizer, "yes")])

    class SyncingChatEnv(ChatEnv):
        async def astep(self, action):
            await engine.update_weights([], version=engine.policy_version + 1)
            return await super().astep(action)

    t = await play(
        SyncingChatEnv(["Sure?"], [0.0, 1.0]), engine, ChatRenderer(tokenizer), max_turns=3
    )

    assert t.turn_policy_versions == (0, 1)
    assert t.policy_version == 0  # the oldest, which decides the episode's staleness


class WaitsForAll(TextEnv):
    """A tool whose step returns only once ``n`` episodes are inside it at the same time."""

    def __init__(self, barrier):
        self.barrier = barrier

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Call the tool."}], {"task_id": f"t{seed}"}

    def step(self, action):
        self.barrier.wait(timeout=20)  # raises BrokenBarrierError if they never all arrive
        return [], 1.0, True, False, {}


async def test_blocking_env_steps_of_every_episode_in_flight_run_side_by_side(tokenizer):
    """Python's default executor has cpu_count + 4 threads (6 on 2 cores); the rollout
    reserves one per episode, so 16 blocking tool calls wait at the same time."""
    import threading

    n = 16
    barrier = threading.Barrier(n)
    pool = EnvPool(lambda: WaitsForAll(barrier), n)
    engine = FakeEngine(lambda prompt: [28, tokenizer.eos_token_id])
    groups = [[EpisodeRequest(group_id=i, reset_seed=i)] for i in range(n)]
    done = [
        t
        async for g in generate_groups(
            pool, engine, ChatRenderer(tokenizer), SamplingParams(max_tokens=4), groups, env_id="w"
        )
        for t in g
    ]
    pool.close()
    assert [t.stop_reason for t in done] == [StopReason.ANSWERED] * n
