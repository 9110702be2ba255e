"""The command line, run as a user runs it: a subprocess of the installed ``palaestra``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

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


def test_eval_reports_accuracy_on_tiny_random():
    out = palaestra(
        "eval",
        "--model",
        "tiny-random",
        "--env",
        "palaestra/ChainSum-v0",
        "--num-tasks",
        "3",
        "--samples",
        "2",
        "--temperature",
        "1.0",
        "--max-tokens",
        "4",
        "--json",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["num_tasks"] == 3 and result["samples"] == 2
    assert set(result["pass_at"]) == {"1", "2"}
    assert 0.0 <= result["accuracy"] <= 1.0


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
