"""The command line, run as a user runs it: a subprocess of the installed ``palaestra``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from palaestra.models import resolve_model

ROOT = Path(__file__).parents[2]
"""The repository root (``examples/`` is importable from there)."""

TINY_OVERRIDES = [
    "model=tiny-random",
    "env.kwargs.source=reasoning_gym:chain_sum",
    "rollout.tasks_per_step=2",
    "rollout.group_size=2",
    "rollout.max_tokens=8",
    "trainer.steps=2",
    "trainer.micro_batch_size=2",
    "eval.num_tasks=4",
    "run.progress=false",
]

SHORT_TOOL_RUN = [
    "rollout.tasks_per_step=2",
    "rollout.group_size=2",
    "rollout.max_tokens=8",
    "trainer.micro_batch_size=4",
    "eval.num_tasks=2",
    "run.progress=false",
]
"""A tool run on the tiny model cut to seconds: 2 tasks x 2 samples of 8 tokens a turn."""


def palaestra(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "palaestra", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_envs_lists_the_registered_math_envs():
    out = palaestra("envs")
    assert out.returncode == 0, out.stderr
    assert "palaestra/Math-v0" in out.stdout.split()


@pytest.mark.slow
def test_two_grpo_steps_on_tiny_random_write_a_complete_run(tmp_path):
    out = palaestra(
        "train",
        "examples/math_grpo.yaml",
        *TINY_OVERRIDES,
        f"run.output_dir={tmp_path}",
        "run.name=smoke",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out accuracy:" in out.stdout
    run = tmp_path / "smoke"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == "tiny-random"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2]
    assert all("reward_mean" in r and "loss" in r for r in records if r["kind"] == "train")
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "trajectories.jsonl").read_text().strip()
    assert (run / "curves.png").stat().st_size > 1000

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "final")
    assert model.config.num_hidden_layers >= 1


@pytest.mark.slow
def test_the_main_job_config_runs_on_the_embedded_model(tmp_path):
    """The README's main job, cut to two small steps: real weights, its engine and learner in
    the precision the machine runs fastest (bfloat16 where native)."""
    out = palaestra(
        "train",
        "examples/math_grpo.yaml",
        "rollout.tasks_per_step=2",
        "rollout.group_size=4",
        "rollout.max_tokens=32",
        "trainer.steps=2",
        "eval.num_tasks=8",
        "run.progress=false",
        f"run.output_dir={tmp_path}",
        "run.name=main",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[precision] learner" in out.stderr  # auto resolved for this machine, said once
    records = [
        json.loads(x) for x in (tmp_path / "main" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2
    assert all(r["infra_failures"] == 0 and r["tokens_mean"] > 0 for r in train)
    # engine vs learner in the same precision on the same weights: ratios stay near 1 on the
    # first step.
    assert abs(train[0]["ratio_mean"] - 1.0) < 0.05


def test_bad_config_fails_before_any_work_naming_the_field(tmp_path):
    out = palaestra(
        "train", "examples/math_grpo.yaml", "rollout.group_size=1", f"run.output_dir={tmp_path}"
    )
    assert out.returncode == 2
    assert "rollout.group_size" in out.stderr
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_unknown_model_is_one_line_error():
    out = palaestra("eval", "--model", "no-such-model", "--num-tasks", "1")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no-such-model" in out.stderr


def test_eval_without_env_or_run_says_it_uses_the_default_env():
    args = "--model tiny-random --num-tasks 3 --samples 2 --temperature 1.0 --max-tokens 4"
    out = palaestra("eval", *args.split(), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "palaestra/Math-v0 (the default env" in out.stderr
    results = json.loads(out.stdout)  # env id -> result
    assert list(results) == ["palaestra/Math-v0"]
    result = results["palaestra/Math-v0"]
    assert result["num_tasks"] == 3 and result["samples"] == 2
    assert set(result["pass_at"]) == set(result["pass_hat"]) == {"1", "2"}
    assert 0.0 <= result["accuracy"] <= 1.0 and result["max_turns"] == 1


def test_eval_of_several_envs_writes_a_table_eval_json_and_episodes(tmp_path):
    """Two envs in one run, one of them a user's env named ``module:EnvId``; no
    ``--max-turns``, so each runs to its own turn limit."""
    custom = "examples.custom_tool_env:example/UnitPrice-v0"
    out = palaestra(
        "eval",
        *("--model", "tiny-random", "--env", "palaestra/ChainSum-v0", "--env", custom),
        *("--env-kwargs", '{"size": 4}', "--env-kwargs", "{}"),  # one per env, in order
        *("--num-tasks", "2", "--samples", "2", "--temperature", "1.0", "--max-tokens", "4"),
        *("--out", str(tmp_path)),
        cwd=ROOT,  # where the user's module is importable from
    )
    assert out.returncode == 0, out.stderr[-2000:]
    header, *rows = out.stdout.splitlines()[1:4]
    assert header.split()[:2] == ["env", "tasks"] and "pass^k" in header
    assert [row.split()[0] for row in rows] == ["palaestra/ChainSum-v0", custom]

    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["settings"]["env"] == ["palaestra/ChainSum-v0", custom]
    assert saved["settings"]["max_turns"] is None and saved["settings"]["samples"] == 2
    chain, tools = saved["results"]["palaestra/ChainSum-v0"], saved["results"][custom]
    assert (chain["env_kwargs"], chain["max_turns"]) == ({"size": 4}, 1)
    assert (tools["max_turns"], tools["max_turns_from"]) == (8, "the env's own limit")
    for field in ("accuracy", "pass_at", "pass_hat", "mean_turns", "mean_tool_calls"):
        assert field in tools
    assert sum(tools["stop_reasons"].values()) == 4 and tools["infra_failures"] == 0

    episodes = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [(e["env_id"], e["task_index"], e["sample"]) for e in episodes[4:]] == [
        (custom, 0, 0),
        (custom, 0, 1),
        (custom, 1, 0),
        (custom, 1, 1),
    ]
    for key in ("task_id", "reward", "success", "stop_reason", "turns", "tool_calls", "text"):
        assert key in episodes[0]
    assert "unit_price" in episodes[-1]["text"]  # the env's tools, in the decoded prompt


def test_eval_of_a_checkpoint_uses_the_envs_its_run_trained_on(tmp_path):
    """A run directory made by hand: config.yaml naming the env, a checkpoint beside it. The
    env's split holds 3 tasks, so asking for 5 is capped, with a note."""
    run = tmp_path / "runs" / "mine"
    shutil.copytree(resolve_model("tiny-random"), run / "checkpoints" / "final")
    env = {"id": "palaestra/ChainSum-v0", "kwargs": {"size": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "grpo", "env": env}))

    model = str(run / "checkpoints" / "final")
    out = palaestra("eval", "--model", model, "--num-tasks", "5", "--max-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "what its run trained on" in out.stderr and str(run / "config.yaml") in out.stderr
    results = json.loads(out.stdout)
    assert list(results) == ["palaestra/ChainSum-v0"]
    result = results["palaestra/ChainSum-v0"]
    assert result["num_tasks"] == 3 and result["env_kwargs"] == {"size": 3}
    assert "5 tasks asked for, but the split holds 3" in result["note"]
    assert result["infra_failures"] == 0  # not 2 made-up failures for tasks that do not exist


def test_eval_refuses_env_kwargs_that_do_not_match_the_envs():
    out = palaestra(
        "eval",
        "--model",
        "tiny-random",
        *("--env", "palaestra/Math-v0", "--env", "palaestra/ChainSum-v0"),
        *("--env-kwargs", "{}", "--env-kwargs", "{}", "--env-kwargs", "{}"),
    )
    assert out.returncode == 2 and "once per env" in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_a_config_naming_a_user_module_env_makes_it_and_records_the_id(tmp_path, monkeypatch):
    """What ``palaestra train`` does with ``env.id: module:EnvId``: the config keeps the
    string (the run's config.yaml records it) and ``palaestra.envs.make`` makes the env."""
    from palaestra.config import load_config
    from palaestra.envs import make

    monkeypatch.syspath_prepend(str(ROOT))
    env_id = "examples.custom_tool_env:example/UnitPrice-v0"
    path = tmp_path / "custom.yaml"
    path.write_text(
        yaml.safe_dump({"stage": "grpo", "model": "tiny-random", "env": {"id": env_id}})
    )

    config = load_config(path)

    assert config.model_dump(mode="json")["env"]["id"] == env_id  # what config.yaml records
    env = make(config.env.id, **config.env.kwargs, split="test")
    _, info = env.reset(seed=0)
    assert info["task_id"].startswith("unit_price/") and info["tools"]
    env.close()


@pytest.mark.slow
def test_train_and_eval_on_a_user_module_env_without_a_wrapper(tmp_path):
    """``palaestra train`` on ``examples.custom_tool_env:example/UnitPrice-v0`` by its
    ``module:EnvId``, then ``palaestra eval`` of the checkpoint on the env the run recorded."""
    env_id = "examples.custom_tool_env:example/UnitPrice-v0"
    out = palaestra(
        "train",
        "examples/tool_grpo.yaml",
        "model=tiny-random",
        f"env.id={env_id}",
        "env.kwargs={}",
        "trainer.steps=1",
        *SHORT_TOOL_RUN,
        f"run.output_dir={tmp_path}",
        "run.name=custom",
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "custom"
    assert yaml.safe_load((run / "config.yaml").read_text())["env"]["id"] == env_id

    evaluated = palaestra(
        "eval",
        *("--model", str(run / "checkpoints" / "final")),
        *("--num-tasks", "2", "--max-tokens", "4", "--json"),
        cwd=ROOT,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert list(json.loads(evaluated.stdout)) == [env_id]


@pytest.mark.slow
def test_multi_turn_grpo_on_a_tool_env_through_the_cli(tmp_path):
    out = palaestra(
        "train",
        "examples/tool_grpo.yaml",
        "model=tiny-random",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.max_tokens=16",
        "rollout.max_turns=3",
        "trainer.steps=2",
        "trainer.micro_batch_size=4",
        "eval.num_tasks=4",
        "run.progress=false",
        f"run.output_dir={tmp_path}",
        "run.name=tools",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the template audit ran for a multi-turn tool run, a verdict per check
    for check in ("prefix extension", "history kept", "tools in prompt", "tool-call round trip"):
        assert f"{check}:" in out.stderr
    records = [
        json.loads(x) for x in (tmp_path / "tools" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    stops = [k for k in train[0] if k.startswith("stop/")]
    assert sum(train[0][k] for k in stops) == 4  # every episode ended with a known reason
    trajectories = [
        json.loads(x) for x in (tmp_path / "tools" / "trajectories.jsonl").read_text().splitlines()
    ]
    assert trajectories


@pytest.mark.slow
def test_the_sft_dpo_grpo_pipeline_example_runs_end_to_end(tmp_path):
    """examples/pipeline_sft_dpo_grpo.yaml through the CLI, each stage cut to 1-2 steps."""
    out = palaestra(
        "train",
        "examples/pipeline_sft_dpo_grpo.yaml",
        "model=tiny-random",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.max_tokens=8",
        "trainer.micro_batch_size=4",
        "eval.num_tasks=4",
        "stages.sft.trainer.steps=2",
        "stages.dpo.trainer.steps=2",
        "stages.grpo.trainer.steps=1",
        "run.progress=false",
        f"run.output_dir={tmp_path}",
        "run.name=pipe",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "pipe"
    assert [line.split(":")[0] for line in out.stdout.splitlines()[:3]] == [
        "stage 1 (sft)",
        "stage 2 (dpo)",
        "stage 3 (grpo)",
    ]
    report = (root / "report.md").read_text()
    for row in ("| 1-sft |", "| 2-dpo |", "| 3-grpo |"):
        assert row in report
    assert "loss " in report and "pref_accuracy " in report  # each stage's own measure
    dpo = yaml.safe_load((root / "2-dpo" / "config.yaml").read_text())
    assert dpo["model"] == str(root / "1-sft" / "checkpoints" / "final")
    assert (root / "2-dpo" / "reference_logprobs.pt").exists()
    assert (root / "3-grpo" / "checkpoints" / "final" / "model.safetensors").exists()

    again = palaestra("train", "examples/pipeline_sft_dpo_grpo.yaml", "--resume", str(root))
    assert again.returncode == 2 and "finished with a different config" in again.stderr


@pytest.mark.slow
def test_the_agent_pipeline_example_runs_end_to_end(tmp_path):
    """examples/agent_pipeline.yaml in a short form on the tiny model: the envs' expert
    episodes from make_agent_data.py, SFT on them, then GRPO over the three-env mixture with
    per-env metrics and a held-out evaluation of every env after each GRPO step."""
    data = tmp_path / "agent_sft.jsonl"
    made = subprocess.run(
        [sys.executable, "examples/make_agent_data.py", "--episodes", "3", "--out", str(data)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    envs = ["palaestra/ToolLookup-v0", "palaestra/Search-v0", "palaestra/FunctionCall-v0"]
    records = [json.loads(x) for x in data.read_text().splitlines()]
    # episodes per env follow the pipeline's weights (1, 1, 2); every one is a success
    assert [sum(r["env_id"] == env for r in records) for env in envs] == [3, 3, 6]
    assert all(r["reward"] == 1.0 for r in records)

    out = palaestra(
        "train",
        "examples/agent_pipeline.yaml",
        "model=tiny-random",
        "engine=transformers",
        f"stages.sft.data.path={data}",
        "stages.sft.data.eval_size=2",
        "stages.sft.trainer.steps=2",
        "stages.grpo.trainer.steps=2",
        "stages.grpo.eval.every_steps=1",
        "rollout.max_turns=2",
        *SHORT_TOOL_RUN,
        f"run.output_dir={tmp_path}",
        "run.name=agent",
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "agent"
    sft = yaml.safe_load((root / "1-sft" / "config.yaml").read_text())
    assert sft["data"]["path"] == str(data)
    grpo = yaml.safe_load((root / "2-grpo" / "config.yaml").read_text())
    assert grpo["model"] == str(root / "1-sft" / "checkpoints" / "final")
    assert [(e["id"], e["weight"]) for e in grpo["env"]] == list(
        zip(envs, [1.0, 1.0, 2.0], strict=True)
    )
    records = [json.loads(x) for x in (root / "2-grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:  # the envs sampled this step, each with its own reward
        sampled = [env for env in envs if f"{env}/episodes" in record]
        assert sampled and all(f"{env}/reward" in record for env in sampled)
        assert sum(record[f"{env}/episodes"] for env in sampled) == 4
    evals = [r for r in records if r["kind"] == "eval" and "accuracy" in r]
    assert [r["step"] for r in evals] == [1, 2]  # every step here; no "before": SFT's "after"
    for record in evals:
        assert all(0.0 <= record[f"{env}/success"] <= 1.0 for env in envs)
