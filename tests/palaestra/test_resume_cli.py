"""``palaestra train --resume``: a run killed with SIGKILL (during a rollout, right after a
learner step, halfway through writing a checkpoint) or stopped with Ctrl-C, then resumed,
ends with the weights of an uninterrupted run and logs every step exactly once; a pipeline
continues its unfinished stage. (PPO's critic is checked in process, in
``tests/trainer/test_resume.py``.)

Each interrupted run is a real ``palaestra train`` subprocess; the uninterrupted runs
they are compared with train in this process on the same config file. Kill points:
``$PALAESTRA_KILL_AT`` (``trainer.train_state.kill_point``) inside palaestra, and the
test env below, which kills its own process at its N-th step (mid-rollout) when asked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from palaestra.cli import main
from palaestra.config import load_pipeline
from palaestra.pipeline import run_pipeline, run_stage
from palaestra.rundir import RunDir
from palaestra.trainer.stages.sampling import group_requests

ENV_MODULE = '''
import os, signal, sys, time
from palaestra.envs import register
from palaestra.envs.core import TextEnv

_steps = 0


class OddLength(TextEnv):
    """One turn; reward 1 for a reply of odd length. Test hooks, by environment variable:
    RESUME_TEST_KILL_AT_ENV_STEP=N kills the process at the N-th step (mid-rollout);
    RESUME_TEST_SLOW_ENV=S makes each step take S seconds and print "env step N" first."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Say anything."}], {"task_id": f"t{seed}"}

    async def areset(self, *, seed=None, options=None):
        # no worker thread: a step's requests reach the engine in one loop turn, so its
        # decode batches (and their float rounding) are the same in every run
        return self.reset(seed=seed, options=options)

    def step(self, action):
        global _steps
        _steps += 1
        if os.environ.get("RESUME_TEST_KILL_AT_ENV_STEP") == str(_steps):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("RESUME_TEST_SLOW_ENV"):
            print(f"env step {_steps}", file=sys.stderr, flush=True)
            time.sleep(float(os.environ["RESUME_TEST_SLOW_ENV"]))
        return [], float(len(action) % 2), True, False, {}


register("resume-test/OddLength-v0", lambda **kwargs: OddLength())
'''

COMMON = {
    "model": "tiny-random",
    "trainer": {"steps": 4, "lr": 0.01, "dtype": "float32", "micro_batch_size": 4},
    "eval": {"before": False, "after": False},
    "run": {"progress": False, "save_every": 1, "log_trajectories": 100},
}
ON_POLICY = COMMON | {
    "env": {"id": "resume_envs:resume-test/OddLength-v0"},
    "engine_dtype": "float32",
    "rollout": {"tasks_per_step": 2, "group_size": 2, "max_tokens": 8},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding the test env's module and a small SFT dataset; the cwd."""
    (tmp_path / "resume_envs.py").write_text(ENV_MODULE)
    rows = [(f"What is {a} + {b}?", a + b) for a in range(1, 13) for b in (2, 5)]
    sft = "\n".join(json.dumps({"prompt": p, "completion": f"{s}"}) for p, s in rows)
    (tmp_path / "sft.jsonl").write_text(sft)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_config(workdir: Path, config: dict, name: str = "config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return path


def uninterrupted(config_path: Path, workdir: Path) -> Path:
    """Train the single-stage config in this process; its run directory."""
    (config,) = load_pipeline(config_path, [])
    run = RunDir(workdir / "reference", config.model_dump(mode="json"))
    run_stage(config, run)
    run.close()
    return run.root


def palaestra(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``palaestra train ...`` in a subprocess, in the cwd, with extra environment."""
    return subprocess.run(
        [sys.executable, "-m", "palaestra", "train", *args],
        env=os.environ | (env or {}) | {"PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        timeout=300,
    )


def killed_then_resumed(config_path: Path, env: dict[str, str]) -> Path:
    """Run the config until the kill, check it died by SIGKILL, resume it to its end."""
    killed = palaestra(str(config_path), "run.name=run", env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = palaestra(str(config_path), "run.name=run", "--resume", "runs/run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed after step" in resumed.stderr
    return Path("runs/run")


def weights(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / name / "model.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
def test_sft_killed_while_writing_a_checkpoint_resumes_bit_identical(workdir):
    config = write_config(workdir, COMMON | {"stage": "sft", "data": {"path": "sft.jsonl"}})
    reference = uninterrupted(config, workdir)

    run = killed_then_resumed(config, {"PALAESTRA_KILL_AT": "checkpoint:2"})

    assert same(weights(run), weights(reference))
    assert train_steps(run) == [1, 2, 3, 4]
    assert not list((run / "checkpoints").glob("*.partial"))  # the torn write is gone


@pytest.mark.slow
def test_grpo_killed_during_a_rollout_resumes_bit_identical(workdir):
    config = write_config(workdir, ON_POLICY | {"stage": "grpo"})
    reference = uninterrupted(config, workdir)

    # 4 episodes a step: the 10th env step is in the middle of step 3's rollouts
    run = killed_then_resumed(config, {"RESUME_TEST_KILL_AT_ENV_STEP": "10"})

    assert same(weights(run), weights(reference))
    assert train_steps(run) == [1, 2, 3, 4]


@pytest.mark.slow
def test_stale_grpo_killed_mid_run_trains_every_group_exactly_once(workdir):
    rollout = ON_POLICY["rollout"] | {"max_staleness": 1}
    config = write_config(workdir, ON_POLICY | {"stage": "grpo", "rollout": rollout})

    run = killed_then_resumed(config, {"PALAESTRA_KILL_AT": "update:3"})

    lines = (run / "trajectories.jsonl").read_text().splitlines()
    trained = [(r["step"], r["group_id"]) for r in map(json.loads, lines)]
    (cfg,) = load_pipeline(config, [])
    expected = [
        (step, g[0].group_id)
        for step in range(1, 5)
        for g in group_requests(cfg, step, 0)
        for _ in g
    ]
    assert sorted(trained) == sorted(expected)  # each step's groups, each once
    assert train_steps(run) == [1, 2, 3, 4]


@pytest.mark.slow
def test_ctrl_c_saves_the_state_within_a_second_and_resumes(workdir):
    run_config = ON_POLICY["run"] | {"save_every": 0}  # the only state is Ctrl-C's
    config = write_config(workdir, ON_POLICY | {"stage": "grpo", "run": run_config})
    reference = uninterrupted(config, workdir)
    env = os.environ | {"PYTHONPATH": os.getcwd(), "RESUME_TEST_SLOW_ENV": "0.2"}
    command = [sys.executable, "-m", "palaestra", "train", str(config), "run.name=run"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # step 3's rollouts have begun
        if line.startswith("env step 9"):
            break
    proc.send_signal(signal.SIGINT)
    sent, saved_s = time.perf_counter(), float("inf")
    rest = []
    for line in proc.stderr:
        rest.append(line)
        if line.startswith("interrupted at step"):
            saved_s = time.perf_counter() - sent  # the state is on disk
    proc.wait(timeout=60)
    exited_s = time.perf_counter() - sent  # after the interpreter's own teardown (~1.2 s)

    assert proc.returncode == 130, "".join(rest)[-2000:]
    said = (  # the command to resume: the same config and overrides
        f"interrupted at step 2; resume with: palaestra train {config} run.name=run "
        "--resume runs/run\n"
    )
    assert said in rest
    # ~0.2 s and ~1.5 s on an idle 2-core machine; the bounds leave room for a loaded one
    assert saved_s < 2.0 and exited_s < 8.0, (saved_s, exited_s)
    assert sorted(p.name for p in Path("runs/run/checkpoints").iterdir()) == ["state-2"]
    resumed = palaestra(str(config), "--resume", "runs/run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same(weights(Path("runs/run")), weights(reference))
    assert train_steps(Path("runs/run")) == [1, 2, 3, 4]


PIPELINE = {
    "model": "tiny-random",
    "data": {"path": "sft.jsonl"},
    "trainer": {"lr": 0.01, "dtype": "float32", "micro_batch_size": 4},
    "eval": {"before": False, "after": False},
    "run": {"progress": False, "save_every": 1},
    "stages": [
        {"stage": "sft", "trainer": {"steps": 2}},
        {"stage": "sft", "trainer": {"steps": 4}},
    ],
}


@pytest.mark.slow
def test_a_killed_pipeline_continues_its_unfinished_stage_from_its_state(workdir):
    config = write_config(workdir, PIPELINE)
    reference = run_pipeline(load_pipeline(config, []), workdir / "reference", PIPELINE)

    # only the second stage reaches step 3
    killed = palaestra(str(config), "run.name=run", env={"PALAESTRA_KILL_AT": "update:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first = Path("runs/run/1-sft/checkpoints/final/model.safetensors")
    stamp = first.stat().st_mtime_ns
    resumed = palaestra(str(config), "run.name=run", "--resume", "runs/run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert first.stat().st_mtime_ns == stamp  # the finished stage was not trained again
    assert "[sft] resumed after step 2" in resumed.stderr
    assert not list(Path("runs").glob("run/2-sft.incomplete-*"))
    assert same(
        weights(Path("runs/run/2-sft")),
        load_file(Path(reference[-1]["checkpoint"]) / "model.safetensors"),
    )
    assert train_steps(Path("runs/run/2-sft")) == [1, 2, 3, 4]


def test_resuming_a_run_without_a_training_state_says_so(workdir, capsys):
    config = write_config(workdir, COMMON | {"stage": "sft", "data": {"path": "sft.jsonl"}})
    stopped = workdir / "runs" / "stopped"
    stopped.mkdir(parents=True)
    (stopped / "metrics.jsonl").write_text("")

    assert main(["train", str(config), "--resume", str(stopped)]) == 2
    assert "no training state in" in capsys.readouterr().err
