"""Pipelines: stages run in order on one model, report their effect, resume between stages."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import yaml

from palaestra import pipeline as pipeline_module
from palaestra.config import load_pipeline, read_config
from palaestra.pipeline import run_pipeline
from palaestra.trainer.stages.common import StageResult

TWO_STAGES = """
model: tiny-random
env:
  id: palaestra/Math-v0
  kwargs: {source: "reasoning_gym:chain_sum"}
rollout: {tasks_per_step: 2, group_size: 2, max_tokens: 8}
trainer: {steps: 1, micro_batch_size: 4}
eval: {num_tasks: 4}
run: {progress: false, log_trajectories: 0}
stages:
  - stage: grpo
  - stage: grpo
    grpo: {advantage: rloo}
"""


def pipeline(tmp_path, text, overrides=()):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return load_pipeline(path, list(overrides)), read_config(path, list(overrides))


@pytest.mark.slow
def test_each_stage_trains_the_checkpoint_of_the_one_before(tmp_path):
    stages, raw = pipeline(tmp_path, TWO_STAGES)
    root = tmp_path / "run"
    results = run_pipeline(stages, root, raw)

    first, second = results
    assert first["checkpoint"] == str(root / "1-grpo" / "checkpoints" / "final")
    assert second["checkpoint"] == str(root / "2-grpo" / "checkpoints" / "final")
    # the second stage's resolved config names the first stage's checkpoint as its model
    config = yaml.safe_load((root / "2-grpo" / "config.yaml").read_text())
    assert config["model"] == first["checkpoint"] and config["grpo"]["advantage"] == "rloo"
    # the first stage evaluates before and after; the second only after
    assert first["before"] is not None and first["after"] is not None
    assert second["before"] is None and second["after"] is not None
    state = json.loads((root / "pipeline.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "done"]
    report = (root / "report.md").read_text()
    assert "| 1-grpo |" in report and "| 2-grpo |" in report
    # the second row's "before" is the first stage's "after"
    after_first = f"{100 * first['after']['accuracy']:.1f}%"
    assert f"| {after_first} → " in report.splitlines()[-1]


@pytest.mark.slow
def test_a_stopped_pipeline_resumes_after_its_last_finished_stage(tmp_path):
    broken = ["stages.1.env.kwargs.source=jsonl:" + str(tmp_path / "missing.jsonl")]
    stages, raw = pipeline(tmp_path, TWO_STAGES, broken)
    root = tmp_path / "run"
    with pytest.raises(Exception, match=r"missing\.jsonl"):
        run_pipeline(stages, root, raw)
    state = json.loads((root / "pipeline.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "running"]
    first_final = root / "1-grpo" / "checkpoints" / "final"
    stamp = (first_final / "model.safetensors").stat().st_mtime_ns

    stages, raw = pipeline(tmp_path, TWO_STAGES)  # the second stage fixed
    results = run_pipeline(stages, root, raw, resume=True)

    assert (first_final / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert results[0]["checkpoint"] == str(first_final)
    assert (root / "2-grpo.incomplete-1").is_dir()  # the failed attempt is kept aside
    assert (root / "2-grpo" / "checkpoints" / "final").is_dir()
    assert [s["status"] for s in json.loads((root / "pipeline.json").read_text())["stages"]] == [
        "done",
        "done",
    ]


def test_resume_refuses_a_finished_stage_whose_config_changed(tmp_path):
    from palaestra.errors import ConfigError

    stages, raw = pipeline(tmp_path, TWO_STAGES)
    root = tmp_path / "run"
    root.mkdir()
    done = {
        "name": "1-grpo",
        "stage": "grpo",
        "config": stages[0].model_dump(mode="json"),
        "status": "done",
        "result": {
            "checkpoint": "x",
            "stage": "grpo",
            "before": None,
            "after": None,
            "metrics": {},
        },
    }
    (root / "pipeline.json").write_text(json.dumps({"stages": [done]}))
    changed, raw = pipeline(tmp_path, TWO_STAGES, ["stages.0.trainer.lr=0.5"])
    with pytest.raises(
        ConfigError, match=r"1-grpo finished with a different config \(sections trainer"
    ):
        run_pipeline(changed, root, raw, resume=True)
    with pytest.raises(ConfigError, match=r"no pipeline\.json"):
        run_pipeline(stages, tmp_path / "elsewhere", raw, resume=True)


SFT_THEN_GRPO = """
model: tiny-random
data: {path: sft.jsonl}
stages:
  - stage: sft
  - stage: grpo
"""


def test_each_stage_runs_through_its_own_function_with_its_own_config(
    tmp_path, monkeypatch, capsys
):
    """The pipeline's own work, with the stage functions replaced: each stage reaches the
    runner of its name with the config class of its stage, on the checkpoint before."""
    from palaestra.options import STAGES

    assert list(pipeline_module.RUNNERS) == list(STAGES)
    calls = []

    def fake_run(config, run):
        calls.append((type(config).__name__, config.model, config.eval.before))
        return StageResult(config.stage, str(run.root / "checkpoints" / "final"))

    for stage in STAGES:
        monkeypatch.setitem(pipeline_module.RUNNERS, stage, fake_run)
    stages, raw = pipeline(tmp_path, SFT_THEN_GRPO)
    root = tmp_path / "run"
    results = run_pipeline(stages, root, raw)

    first = str(root / "1-sft" / "checkpoints" / "final")
    assert calls == [("SFTStage", "tiny-random", True), ("GRPOStage", first, False)]
    assert [r["checkpoint"] for r in results] == [
        first,
        str(root / "2-grpo" / "checkpoints" / "final"),
    ]
    assert capsys.readouterr().err.count("[precision] learner") == 2  # said once per stage


def test_a_finished_stage_is_freed_before_the_next_one_starts(tmp_path, monkeypatch):
    """A stage's objects in reference cycles (a model and the hooks and closures that
    point back at it) are collected between stages, not in the middle of the next one."""
    from palaestra.options import STAGES

    left_behind: list[weakref.ref] = []
    alive_at_start = []

    def stage_with_a_cycle(config, run):
        alive_at_start.append([ref() is not None for ref in left_behind])
        model = torch.nn.Linear(4, 4)
        model.owner = {"model": model}  # a cycle, as a hook or closure over the model makes
        left_behind.append(weakref.ref(model))
        return StageResult(config.stage, str(run.root / "checkpoints" / "final"))

    for stage in STAGES:
        monkeypatch.setitem(pipeline_module.RUNNERS, stage, stage_with_a_cycle)
    gc.disable()  # the cycle collector would otherwise run whenever allocations say so
    try:
        stages, raw = pipeline(tmp_path, SFT_THEN_GRPO)
        run_pipeline(stages, tmp_path / "run", raw)
    finally:
        gc.enable()
    assert alive_at_start == [[], [False]]


def test_the_pipeline_state_is_replaced_whole_and_made_durable(tmp_path, monkeypatch):
    """``pipeline.json`` is what ``--resume`` reads: it is written beside, flushed to disk,
    renamed over the old one, and the rename flushed (the directory), so a crash leaves
    the old state or the new one."""
    import os

    from palaestra.pipeline import STATE_FILE, save_pipeline_state

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    (tmp_path / STATE_FILE).write_text('{"stages": ["old"]}')
    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_pipeline_state(tmp_path, {"stages": ["new"]})

    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"stages": ["new"]}
    assert synced == [str(tmp_path / (STATE_FILE + ".partial")), str(tmp_path)]
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]
