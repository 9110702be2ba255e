"""The chat renderer and tools: a template that ignores ``tools=`` gets the tools described in
the system message (once), one that renders them keeps the messages as they are."""

from __future__ import annotations

import logging

from palaestra.agent.engines import FakeEngine
from palaestra.agent.engines.base import SamplingParams
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import EpisodeRequest, run_episode
from palaestra.envs import make

EOT = "<|im_end|>"


def reply(tokenizer, text: str) -> list[int]:
    """Ids a model would sample for ``text``, closing its turn."""
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(EOT)]


async def play(env, engine, renderer, *, seed: int):
    return await run_episode(
        env, engine, renderer, SamplingParams(), EpisodeRequest(0, seed), env_id="test"
    )


def with_template(tokenizer, template: str):
    other = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other.chat_template = template
    return other


async def test_tools_a_template_ignores_are_described_in_the_system_message(tokenizer, caplog):
    env = make("palaestra/ToolLookup-v0", split="train")
    messages, info = env.reset(seed=7)
    renderer = ChatRenderer(tokenizer)
    assert not renderer.renders_tools(messages, info["tools"])  # SmolLM2's template
    engine = FakeEngine(lambda prompt: reply(tokenizer, "\\boxed{1}"))

    with caplog.at_level(logging.WARNING, logger="palaestra.agent.render"):
        for seed in (7, 8):
            await play(env, engine, renderer, seed=seed)

    prompt = tokenizer.decode(engine.prompts[0])
    assert prompt.count(info["tool_instructions"]) == 1 and '"name": "lookup"' in prompt
    assert prompt.index(info["tool_instructions"]) < prompt.index("<|im_start|>user")
    assert len([r for r in caplog.records if "ignores tools=" in r.message]) == 1  # once
    env.close()

    described = make("palaestra/ToolLookup-v0", split="train", tools_in_prompt=True)
    engine = FakeEngine(lambda prompt: reply(tokenizer, "\\boxed{1}"))
    await play(described, engine, renderer, seed=7)
    assert tokenizer.decode(engine.prompts[0]).count("<tools>") == 1  # not described twice
    described.close()


TOOL_RENDERING = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function.name') "
    "| join(', ') }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_renders_tools_keeps_the_messages(tokenizer):
    renderer = ChatRenderer(with_template(tokenizer, TOOL_RENDERING))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]

    assert renderer.renders_tools(messages, tools)
    assert renderer.with_tool_instructions(messages, tools, "use lookup") == messages
    plain = ChatRenderer(tokenizer)
    described = plain.with_tool_instructions(messages, tools, "use lookup")
    assert described[0] == {"role": "system", "content": "Be brief.\n\nuse lookup"}
    assert plain.with_tool_instructions(messages[1:], tools, "use lookup")[0] == {
        "role": "system",
        "content": "use lookup",
    }
    assert plain.with_tool_instructions(messages, None, "use lookup") == messages
