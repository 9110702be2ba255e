"""PPO with a critic, through the stage: values on model tokens, warm-up, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from palaestra.config import load_config
from palaestra.envs import register
from palaestra.envs.core import TextEnv
from palaestra.rundir import RunDir
from palaestra.trainer.critic import Critic
from palaestra.trainer.data import ChatEncoder, token_batch
from palaestra.trainer.learner import Learner, OptimSettings
from palaestra.trainer.losses import value_loss
from palaestra.trainer.stages.ppo import run_ppo


class ToolThenAnswer(TextEnv):
    """Two assistant turns with a tool reply between them; the second is scored."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return [{"role": "user", "content": "Look it up."}], {"task_id": f"t{seed}"}

    def step(self, action):
        self.turn += 1
        if self.turn == 1:
            return [{"role": "tool", "content": "result: 42"}], 0.1, False, False, {}
        return [], float(len(action) % 2), True, False, {}


register("palaestra-test/PPOTool-v0", lambda **kwargs: ToolThenAnswer())

BASE = [
    "model=tiny-random",
    "stage=ppo",
    "env.id=palaestra-test/OddLength-v0",
    "rollout.tasks_per_step=2",
    "rollout.group_size=4",
    "rollout.max_tokens=6",
    "trainer.lr=1e-3",
    "ppo.critic_lr=1e-2",
    "eval.before=false",
    "eval.after=false",
    "run.progress=false",
]


def run(tmp_path, *overrides, name="run"):
    cfg = load_config(None, [*BASE, *overrides])
    run_dir = RunDir(tmp_path / name, cfg.model_dump(mode="json"))
    result = run_ppo(cfg, run_dir)
    run_dir.close()
    lines = (run_dir.root / "metrics.jsonl").read_text().splitlines()
    return result, [r for r in map(json.loads, lines) if r["kind"] == "train"]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_the_critic_learns_the_return_and_both_checkpoints_are_written(tmp_path):
    result, records = run(tmp_path, "trainer.steps=6")
    losses = [r["critic/value_loss"] for r in records]
    assert losses[-1] < losses[0]  # values move towards the observed returns
    assert all(math.isfinite(r["loss"]) for r in records)
    critic_dir = tmp_path / "run" / "checkpoints" / "critic-final"
    assert (critic_dir / "value_head.pt").exists()
    head = torch.load(critic_dir / "value_head.pt")
    assert head["weight"].abs().sum() > 0  # the zero-initialised head was trained
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.checkpoint)


def test_critic_warmup_leaves_the_policy_untouched(tmp_path):
    from palaestra.models import resolve_model

    _, records = run(tmp_path, "trainer.steps=2", "ppo.critic_warmup_steps=2")
    assert all(r["critic/warmup"] == 1.0 and "loss" not in r for r in records)
    before = weights(resolve_model("tiny-random"))
    after = weights(tmp_path / "run" / "checkpoints" / "final")
    assert all(torch.equal(before[k].float(), after[k].float()) for k in before)


def test_multi_turn_ppo_trains_across_a_tool_reply_and_a_split_episode(tmp_path):
    from palaestra.models import resolve_model

    _, records = run(
        tmp_path, "env.id=palaestra-test/PPOTool-v0", "rollout.max_turns=2", "trainer.steps=2"
    )
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["critic/value_loss"]) for r in records)
    # a template that rewrites history splits each episode in two samples; GAE still runs
    # over the whole episode
    model_dir = tmp_path / "rewriting"
    shutil.copytree(resolve_model("tiny-random"), model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier){% else %}{{ m.content }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _, records = run(
        tmp_path,
        f"model={model_dir}",
        "env.id=palaestra-test/PPOTool-v0",
        "rollout.max_turns=2",
        "trainer.steps=2",
        name="split",
    )
    assert all(r["episodes_split"] == 8 and math.isfinite(r["loss"]) for r in records)


def test_critic_values_live_on_sampled_tokens_only():
    from palaestra.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    chat = [
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "<tool_call>x</tool_call>"},
        {"role": "tool", "content": "result: 42"},
        {"role": "assistant", "content": "42"},
    ]
    batch = token_batch([ChatEncoder(tokenizer, 256).encode(chat)], tokenizer.pad_token_id)
    critic = Critic.from_pretrained("tiny-random")
    torch.nn.init.normal_(critic.head.weight)  # nonzero values everywhere it is read
    learner = Learner(critic, OptimSettings(lr=1e-2), forward=lambda model, micro: model(micro))
    values = learner.score(batch)
    sampled = batch.loss_mask_BT.bool()
    assert (values[~sampled] == 0).all() and (values[sampled] != 0).all()
    returns = torch.where(sampled, torch.ones_like(values), 0.0)

    def critic_step(old_values_BT):
        targets = dataclasses.replace(batch, old_values_BT=old_values_BT, returns_BT=returns)
        return learner.step(targets, value_loss_fn, weigh_metrics_by="tokens")["value_loss"]

    first = critic_step(values)
    for _ in range(5):
        last = critic_step(learner.score(batch))
    assert last < first


def value_loss_fn(batch, values_BT, *, num_tokens, num_seqs):
    return value_loss(
        values_BT,
        batch.old_values_BT,
        batch.returns_BT,
        batch.loss_mask_BT,
        clip=0.2,
        num_tokens=num_tokens,
    )


@pytest.mark.parametrize("bad", ["ppo.lam=1.5", "ppo.value_clip=0"])
def test_bad_ppo_settings_fail_at_load(bad):
    from palaestra.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ppo\.(lam|value_clip)"):
        load_config(None, [*BASE, bad])
