"""Training on several envs: sampling by weight, per-env metrics, evaluation curves, and the
alarm for runs without a learning signal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from palaestra import envs
from palaestra.config import load_config
from palaestra.envs import register
from palaestra.envs.core import TextEnv
from palaestra.envs.mixture import EnvMixture
from palaestra.errors import ConfigError
from palaestra.rundir import RunDir
from palaestra.trainer.stages.grpo import run_grpo


class Echo(TextEnv):
    """One turn; the reply's length parity is the reward; the env's name is in its prompt."""

    def __init__(self, name: str, split: str = "train") -> None:
        self.name = name

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": f"{self.name}: say anything."}], {"task_id": str(seed)}

    def step(self, action):
        return [], float(len(action) % 2), True, False, {}


register("palaestra-test/EchoA-v0", lambda **kw: Echo("A", **kw))
register("palaestra-test/EchoB-v0", lambda **kw: Echo("B", **kw))


def test_a_mixture_draws_envs_by_weight_and_a_group_plays_one_env():
    mixture = EnvMixture(
        [
            ("a", envs.make("palaestra-test/EchoA-v0"), 3.0),
            ("b", envs.make("palaestra-test/EchoB-v0"), 1.0),
        ]
    )
    picks = [mixture.reset(seed=seed)[1]["env_id"] for seed in range(4000)]
    share_a = picks.count("a") / len(picks)
    # binomial(4000, 0.75): standard error 0.0068; 5 of them is a 1-in-a-million miss
    assert abs(share_a - 0.75) < 5 * np.sqrt(0.75 * 0.25 / len(picks))
    # the same reset seed (one group's episodes) always plays the same env and task
    for seed in range(20):
        first = mixture.reset(seed=seed)
        again = mixture.reset(seed=seed)
        assert first == again
    observation, info = mixture.reset(seed=7)
    assert observation[0]["content"].startswith({"a": "A", "b": "B"}[info["env_id"]])
    assert mixture.step("odd")[1] == 1.0


def test_a_config_lists_envs_with_weights_and_refuses_a_repeated_one():
    cfg = load_config(
        None,
        ["env=[{id: palaestra-test/EchoA-v0, weight: 2}, {id: palaestra-test/EchoB-v0}]"],
    )
    assert [(e.id, e.weight) for e in cfg.train_envs()] == [
        ("palaestra-test/EchoA-v0", 2.0),
        ("palaestra-test/EchoB-v0", 1.0),
    ]
    assert cfg.eval_envs() == cfg.train_envs()
    with pytest.raises(ConfigError, match="names an env twice"):
        load_config(None, ["env=[{id: palaestra-test/EchoA-v0}, {id: palaestra-test/EchoA-v0}]"])


MIXTURE = [
    "model=tiny-random",
    "env=[{id: palaestra-test/EchoA-v0, weight: 1}, {id: palaestra-test/EchoB-v0, weight: 1}]",
    "rollout.tasks_per_step=4",
    "rollout.group_size=2",
    "rollout.max_tokens=5",
    "trainer.steps=2",
    "eval.num_tasks=3",
    "eval.max_tokens=4",
    "eval.every_steps=1",
    "run.progress=false",
]


def records(tmp_path, overrides):
    config = load_config(None, overrides)
    run = RunDir(tmp_path / "run", config.model_dump(mode="json"))
    run_grpo(config, run)
    run.close()
    return [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_mixture_run_logs_each_env_per_step_and_evaluates_every_step(tmp_path):
    logged = records(tmp_path, MIXTURE)
    train = [r for r in logged if r["kind"] == "train"]
    evals = [r for r in logged if r["kind"] == "eval"]
    for record in train:
        played = [k.split("/")[1] for k in record if k.endswith("/episodes")]
        assert played and set(played) <= {"EchoA-v0", "EchoB-v0"}
        episodes = sum(v for k, v in record.items() if k.endswith("/episodes"))
        assert episodes == 8  # every episode of the step is counted under its env
    # before training, after step 1 (every_steps=1), and after training at step 2
    assert [r["step"] for r in evals] == [0, 1, 2]
    for record in evals:
        assert {"palaestra-test/EchoA-v0/success", "palaestra-test/EchoB-v0/success"} <= set(record)
        per_env = [
            record["palaestra-test/EchoA-v0/success"],
            record["palaestra-test/EchoB-v0/success"],
        ]
        assert record["accuracy"] == pytest.approx(np.mean(per_env))  # equal task counts


def test_a_tool_env_without_a_single_tool_call_raises_the_alarm_and_can_stop(tmp_path, capfd):
    logged = records(
        tmp_path,
        [
            "model=tiny-random",
            "env.id=palaestra/ToolLookup-v0",
            "rollout.tasks_per_step=2",
            "rollout.group_size=2",
            "rollout.max_tokens=3",
            "rollout.max_turns=2",
            "trainer.steps=6",
            "trainer.no_signal_steps=2",
            "trainer.stop_without_signal=true",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
        ],
    )
    train = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]  # stopped when the alarm fired
    assert all(r["tool_calls_per_episode"] == 0 for r in train)
    assert "no tool call was parsed in any episode of the last 2 steps" in capfd.readouterr().err
