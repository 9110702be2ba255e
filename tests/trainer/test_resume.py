"""Exact resume in process: a stage reopened at a training state ends with the weights an
uninterrupted run ends with, logs each step once, and the training state itself is
written atomically, pruned and refused when the training config changed.

The kill -9 and Ctrl-C cases run ``palaestra train`` in a subprocess:
``tests/palaestra/test_resume_cli.py``."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file

from palaestra.config import load_config
from palaestra.envs import register
from palaestra.envs.core import TextEnv
from palaestra.errors import ConfigError
from palaestra.models import resolve_model
from palaestra.rundir import RunDir
from palaestra.trainer.data import batch_indices
from palaestra.trainer.learner import Learner
from palaestra.trainer.stages.common import StopOnCtrlC
from palaestra.trainer.stages.dpo import run_dpo
from palaestra.trainer.stages.grpo import run_grpo
from palaestra.trainer.stages.health import SignalWatch
from palaestra.trainer.stages.online_dpo import run_online_dpo
from palaestra.trainer.stages.ppo import run_ppo
from palaestra.trainer.stages.sampling import group_requests
from palaestra.trainer.stages.sft import run_sft
from palaestra.trainer.train_state import (
    TrainingInterrupted,
    latest_state,
    load_state,
    state_step,
)


class OddLength(TextEnv):
    """One turn; reward 1 for a reply of odd length, so groups have winners and losers."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Say anything."}], {"task_id": f"t{seed}"}

    async def areset(self, *, seed=None, options=None):
        # no worker thread: a step's requests reach the engine in one loop turn, so its
        # decode batches (and their float rounding) are the same in every run
        return self.reset(seed=seed, options=options)

    def step(self, action):
        return [], float(len(action) % 2), True, False, {}


register("resume-test/InProcessOddLength-v0", lambda **kwargs: OddLength())

RUNNERS = {
    "sft": run_sft,
    "dpo": run_dpo,
    "grpo": run_grpo,
    "ppo": run_ppo,
    "online_dpo": run_online_dpo,
}

ON_POLICY = [
    "env.id=resume-test/InProcessOddLength-v0",
    "rollout.tasks_per_step=2",
    "rollout.group_size=2",
    "rollout.max_tokens=8",
    "trainer.lr=0.01",
    "run.log_trajectories=100",
]


@pytest.fixture
def data(tmp_path):
    rows = [(f"What is {a} + {b}?", a + b) for a in range(1, 13) for b in (2, 5)]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": p, "completion": f"{s}"}) for p, s in rows))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "\n".join(
            json.dumps({"prompt": p, "chosen": f"{s}", "rejected": f"{s + 1}"}) for p, s in rows
        )
    )
    return {"sft": sft, "dpo": prefs}


def config(stage, *overrides):
    return load_config(
        None,
        [
            "model=tiny-random",
            f"stage={stage}",
            "trainer.steps=4",
            "trainer.dtype=float32",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
            "run.save_every=2",
            *overrides,
        ],
    )


def dataset_config(stage, data, *overrides):
    return config(
        stage,
        f"data.path={data[stage]}",
        "trainer.lr=0.01",
        "trainer.micro_batch_size=4",
        "data.batch_size=4",
        "data.eval_size=4",
        *overrides,
    )


def train(cfg, root):
    """Run the stage uninterrupted into ``root``; its final weights."""
    run = RunDir(root, cfg.model_dump(mode="json"))
    RUNNERS[cfg.stage](cfg, run)
    run.close()
    return load_file(root / "checkpoints" / "final" / "model.safetensors")


def resume(cfg, root):
    """Reopen ``root`` at its newest state and run the stage to its end; the final weights."""
    state = latest_state(root / "checkpoints")
    run = RunDir.reopen(root, cfg.model_dump(mode="json"), state_step(state))
    RUNNERS[cfg.stage](cfg, run)
    run.close()
    return load_file(root / "checkpoints" / "final" / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def initial_weights():
    return load_file(resolve_model("tiny-random") / "model.safetensors")


def records(root, name="metrics.jsonl", kind="train"):
    lines = (root / name).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_dataset_stage_resumed_from_its_state_ends_bit_identical(tmp_path, data, stage):
    cfg = dataset_config(stage, data)
    uninterrupted = train(cfg, tmp_path / "run")
    assert not same(uninterrupted, initial_weights())  # the steps trained something

    resumed = resume(cfg, tmp_path / "run")  # continues after step 2: steps 3 and 4 again

    assert same(resumed, uninterrupted)
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3, 4]


@pytest.mark.parametrize("stage", ["grpo", "online_dpo"])
def test_an_on_policy_stage_resumed_from_its_state_ends_bit_identical(tmp_path, stage):
    cfg = config(stage, *ON_POLICY, "engine_dtype=float32")
    uninterrupted = train(cfg, tmp_path / "run")
    assert not same(uninterrupted, initial_weights())

    assert same(resume(cfg, tmp_path / "run"), uninterrupted)
    steps = [(r["step"], r["group_id"]) for r in records(tmp_path / "run", "trajectories.jsonl")]
    expected = [
        (step, group[0].group_id)
        for step in range(1, 5)
        for group in group_requests(cfg, step, rounds=0)
        for _ in group
    ]
    assert sorted(steps) == sorted(expected)  # each step's groups, logged once
    # the state of step 2 holds the health counters after step 2, as the run had them
    watch = SignalWatch(cfg.trainer.no_signal_steps)
    for record in records(tmp_path / "run")[:2]:
        watch.update(record)
    progress = json.loads((tmp_path / "run/checkpoints/state-2/state.json").read_text())
    assert progress["progress"]["watch"] == [watch.without_tool_calls, watch.without_signal]


def test_ppo_resumes_its_critic_too(tmp_path):
    cfg = config("ppo", *ON_POLICY, "engine_dtype=float32", "ppo.critic_lr=0.01")
    uninterrupted = train(cfg, tmp_path / "run")
    critic = torch.load(tmp_path / "run" / "checkpoints" / "state-2" / "critic.pt")
    assert torch.count_nonzero(critic["head.weight"]) > 0  # the critic trained by step 2
    final_critic = load_file(
        tmp_path / "run" / "checkpoints" / "critic-final" / "model.safetensors"
    )
    head = torch.load(tmp_path / "run" / "checkpoints" / "critic-final" / "value_head.pt")

    assert same(resume(cfg, tmp_path / "run"), uninterrupted)
    critic_dir = tmp_path / "run" / "checkpoints" / "critic-final"
    assert same(load_file(critic_dir / "model.safetensors"), final_critic)
    assert same(torch.load(critic_dir / "value_head.pt"), head)


def test_states_are_pruned_to_keep_last_with_one_permission_for_every_file(tmp_path, data):
    cfg = dataset_config("sft", data, "run.save_every=1", "run.keep_last=2")
    previous = os.umask(0o027)  # a umask the library's defaults would not give
    try:
        train(cfg, tmp_path / "run")
    finally:
        os.umask(previous)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["final", "state-2", "state-3"]
    for directory in ("state-3", "final"):
        modes = {stat.S_IMODE(p.stat().st_mode) for p in (checkpoints / directory).iterdir()}
        assert modes == {0o640}, directory
    state = torch.load(checkpoints / "state-3" / "optimizer.pt")
    assert state["policy"]["steps"] == 3
    weights = load_file(checkpoints / "state-3" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the master weights' dtype


def test_a_changed_training_config_is_refused_but_more_steps_are_not(tmp_path, data):
    cfg = dataset_config("sft", data)
    train(cfg, tmp_path / "run")
    state = latest_state(tmp_path / "run" / "checkpoints")
    longer = dataset_config("sft", data, "trainer.steps=8", "run.progress=true")
    assert load_state(state, longer.model_dump(mode="json")).step == 2

    changed = dataset_config("sft", data, "trainer.lr=0.5")
    with pytest.raises(ConfigError, match="sections trainer differ"):
        load_state(state, changed.model_dump(mode="json"))


def test_reopening_a_run_drops_later_records_and_a_line_cut_short(tmp_path):
    run = RunDir(tmp_path / "run", {})
    for step in (1, 2, 3):
        run.log(step, {"loss": float(step)})
    run.log(3, {"accuracy": 0.5}, kind="eval")
    run.close()
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a write a kill cut short

    reopened = RunDir.reopen(tmp_path / "run", {"resumed": True}, 2)
    reopened.log(3, {"loss": 30.0})
    reopened.close()

    logged = [
        (r["kind"], r["step"], r.get("loss")) for r in records(tmp_path / "run", kind="train")
    ]
    assert logged == [("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 30.0)]
    assert records(tmp_path / "run", kind="eval") == []
    assert [r["step"] for r in reopened.history] == [1, 2, 3]


def test_batches_skipped_on_resume_are_those_an_uninterrupted_run_drew():
    whole = batch_indices(7, 3, seed=5)
    drawn = [next(whole) for _ in range(6)]
    resumed = batch_indices(7, 3, seed=5, skip=4)
    assert [next(resumed), next(resumed)] == drawn[4:]


def test_ctrl_c_in_a_dataset_stage_saves_the_finished_step_and_resumes_exactly(
    tmp_path, data, monkeypatch
):
    cfg = dataset_config("sft", data, "run.save_every=0")
    uninterrupted = train(cfg, tmp_path / "reference")
    step = Learner.step

    def step_then_ctrl_c(learner, *args, **kwargs):  # Ctrl-C lands during step 2's update
        metrics = step(learner, *args, **kwargs)
        if learner.steps == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(Learner, "step", step_then_ctrl_c)
    # as in a terminal (a background job, as CI may run this, starts with SIGINT ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted, match="interrupted at step 2"):
            train(cfg, tmp_path / "run")
        handed_back = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    monkeypatch.setattr(Learner, "step", step)

    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["state-2"]
    assert handed_back is signal.default_int_handler
    assert same(resume(cfg, tmp_path / "run"), uninterrupted)


def test_a_second_ctrl_c_quits_at_once():
    with StopOnCtrlC() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_state_caught_mid_replacement_is_found_under_its_old_name(tmp_path):
    # replacing state-2 renames it state-2.old first; a kill right then leaves only that
    checkpoints = tmp_path / "checkpoints"
    for name, step in [("state-1", 1), ("state-2.old", 2), ("state-3.partial", 3)]:
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "state.json").write_text(json.dumps({"step": step}))

    assert latest_state(checkpoints) == checkpoints / "state-2.old"

    (checkpoints / "state-2").mkdir()  # the replacement took its name: the .old one goes
    (checkpoints / "state-2" / "state.json").write_text(json.dumps({"step": 2}))
    assert latest_state(checkpoints) == checkpoints / "state-2"
