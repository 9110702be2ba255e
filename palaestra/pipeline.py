"""Run training stages in order on one model: SFT, then the DPO family, then RL.

A config with ``stages: [...]`` (see ``config.load_pipeline``) runs here. Stage ``i + 1``
starts from the final checkpoint of stage ``i``; each stage writes a run directory of its
own inside the pipeline's::

    runs/<name>/
      config.yaml        the pipeline config as given (after overrides)
      pipeline.json      each stage: its resolved config, status and result
      report.md          what each stage changed: env accuracy and its own measures
      1-sft/             a stage's run directory (metrics.jsonl, checkpoints/, ...)
      2-dpo/
      3-grpo/

A stopped pipeline resumes (``palaestra train CONFIG --resume RUN_DIR``): stages marked
done in ``pipeline.json`` are skipped when their config is unchanged, and the next stage
starts from the last done stage's checkpoint. A stage that did not finish continues from
its newest training state (``checkpoints/state-<step>``, ``trainer.train_state``) in its
own directory; one without a training state is moved aside (``2-dpo.incomplete-1``),
never deleted, and runs again from its start. ``reopen_run`` does the same for a
single-stage run.

What this module does not do: train. The stage loops in ``palaestra.trainer.stages`` do.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from palaestra.config import TrainConfig
from palaestra.errors import ConfigError
from palaestra.rundir import RunDir, write_text_atomically
from palaestra.trainer.stages import dpo, grpo, online_dpo, ppo, reward_model, sft
from palaestra.trainer.stages.common import StageResult, return_freed_memory
from palaestra.trainer.train_state import latest_state, load_state, state_step

StageRunner = Callable[[Any, RunDir], StageResult]
"""``run_<stage>(config, run_dir) -> StageResult``; its config is the class of its stage."""

RUNNERS: dict[str, StageRunner] = {
    "sft": sft.run_sft,
    "dpo": dpo.run_dpo,
    "reward_model": reward_model.run_reward_model,
    "grpo": grpo.run_grpo,
    "ppo": ppo.run_ppo,
    "online_dpo": online_dpo.run_online_dpo,
}
"""Stage name -> the function running it. ``load_pipeline`` validates each stage into the
config class its name selects, so ``RUNNERS[config.stage]`` gets the class it takes."""

STATE_FILE = "pipeline.json"


def run_stage(config: TrainConfig, run: RunDir) -> StageResult:
    """Run one stage into ``run``; returns its ``StageResult``."""
    print(f"[precision] {config.precision().describe()}", file=sys.stderr)
    return RUNNERS[config.stage](config, run)


def run_pipeline(
    stages: list[TrainConfig], root: Path, raw_config: dict[str, Any], *, resume: bool = False
) -> list[dict[str, Any]]:
    """Run ``stages`` in order into the pipeline directory ``root``; returns their results.

    With ``resume``, ``root`` must hold an earlier run of the same pipeline: its finished
    stages are skipped (and their results read back), the rest run.
    """
    state = _resume_state(root, stages) if resume else _new_state(root, raw_config)
    results: list[dict[str, Any]] = []
    model: str | None = None
    for i, config in enumerate(stages):
        entry = state["stages"][i] if i < len(state["stages"]) else None
        name = f"{i + 1}-{config.stage}"
        if model is not None:  # train the checkpoint of the stage before
            config = config.model_copy(update={"model": model})
        if entry is not None and entry["status"] == "done":
            print(f"[pipeline] {name}: done earlier, skipped", file=sys.stderr)
            results.append(entry["result"])
            model = entry["result"]["checkpoint"]
            continue
        run = _continue_stage(root / name, config)
        if run is None:
            _move_aside(root / name)
            print(f"[pipeline] {name}: starting from {config.model}", file=sys.stderr)
        entry = {"name": name, "stage": config.stage, "config": _dump(config), "status": "running"}
        state["stages"][i:] = [entry]
        save_pipeline_state(root, state)
        started = time.time()
        run = run or RunDir(root / name, _dump(config))
        try:
            result = run_stage(config, run)
        finally:
            run.close()
            release_memory()
        entry |= {"status": "done", "seconds": time.time() - started, "result": _record(result)}
        save_pipeline_state(root, state)
        results.append(entry["result"])
        model = result.checkpoint
        write_report(root, state)
    return results


def release_memory() -> None:
    """Free what a finished stage left behind before the next one loads its models (what
    sits in reference cycles waits for the cycle collector, which runs when allocation
    counts say so: the agent pipeline's GRPO stage had 16.5 GB resident after its first
    step, 8.7 GB after its second), then hand the freed pages back to the OS."""
    gc.collect()
    return_freed_memory()


def reopen_run(root: Path, config: TrainConfig) -> RunDir:
    """The run directory ``root`` of a stopped single-stage run, reopened at its newest
    training state; ``ConfigError`` if it has none or the training config changed."""
    run = _continue_stage(root, config)
    if run is None:
        raise ConfigError(
            f"--resume {root}: no training state in {root / 'checkpoints'} to continue from "
            "(states are saved every run.save_every steps and on Ctrl-C)"
        )
    return run


def _continue_stage(root: Path, config: TrainConfig) -> RunDir | None:
    """``root`` reopened at its newest training state, checked against ``config``; None
    where no state was saved."""
    path = latest_state(root / "checkpoints") if root.is_dir() else None
    if path is None:
        return None
    load_state(path, _dump(config))  # refuses a changed training config before any loading
    step = state_step(path)
    print(f"[resume] {root}: continuing after step {step} ({path.name})", file=sys.stderr)
    return RunDir.reopen(root, _dump(config), step)


def write_report(root: Path, state: dict[str, Any]) -> Path:
    """Write ``report.md``: each finished stage's env accuracy and own measures, before and
    after, so the effect of every stage reads off one table."""
    lines = [
        f"# Pipeline {root.name}",
        "",
        "| stage | time | env accuracy before → after | the stage's own measures | checkpoint |",
        "|---|---|---|---|---|",
    ]
    previous_after: float | None = None
    for entry in state["stages"]:
        if entry["status"] != "done":
            continue
        result = entry["result"]
        before = _accuracy(result["before"])
        before = previous_after if before is None else before
        after = _accuracy(result["after"])
        lines.append(
            f"| {entry['name']} | {entry['seconds'] / 60:.1f} min "
            f"| {_fmt(before)} → {_fmt(after)} | {_own_measures(result['metrics'])} "
            f"| `{result['checkpoint']}` |"
        )
        previous_after = after if after is not None else previous_after
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _new_state(root: Path, raw_config: dict[str, Any]) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=False)
    (root / "config.yaml").write_text(yaml.safe_dump(raw_config, sort_keys=False))
    return {"stages": []}


def _resume_state(root: Path, stages: list[TrainConfig]) -> dict[str, Any]:
    """The saved state of ``root``, checked against ``stages``: a finished stage whose
    config changed since cannot be skipped."""
    path = root / STATE_FILE
    if not path.exists():
        raise ConfigError(f"--resume {root}: no {STATE_FILE} there; is it a pipeline run?")
    state = json.loads(path.read_text())
    model: str | None = None
    for i, entry in enumerate(state["stages"]):
        if entry["status"] != "done":
            break
        if i >= len(stages):
            raise ConfigError(f"--resume {root}: the run has more stages than the config")
        config = stages[i] if model is None else stages[i].model_copy(update={"model": model})
        if entry["config"] != _dump(config):
            changed = sorted(
                k for k in entry["config"] if entry["config"][k] != _dump(config).get(k)
            )
            raise ConfigError(
                f"--resume {root}: stage {entry['name']} finished with a different config "
                f"(sections {', '.join(changed)} differ); resume with the config it ran with, "
                "or start a new run"
            )
        model = entry["result"]["checkpoint"]
    return state


def _move_aside(path: Path) -> None:
    """Keep what an unfinished earlier attempt wrote, under a new name."""
    if not path.exists():
        return
    n = 1
    while path.with_name(f"{path.name}.incomplete-{n}").exists():
        n += 1
    shutil.move(path, path.with_name(f"{path.name}.incomplete-{n}"))


def save_pipeline_state(root: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as the pipeline's ``pipeline.json``, atomically and durably (a crash
    leaves the state before or after, which ``--resume`` reads)."""
    write_text_atomically(root / STATE_FILE, json.dumps(state, indent=1))


def _dump(config: TrainConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")


def _record(result: StageResult) -> dict[str, Any]:
    """A ``StageResult`` as JSON-ready data."""
    return {
        "stage": result.stage,
        "checkpoint": result.checkpoint,
        "before": asdict(result.before) if result.before is not None else None,
        "after": asdict(result.after) if result.after is not None else None,
        "metrics": dict(result.metrics),
    }


def _accuracy(evaluation: dict[str, Any] | None) -> float | None:
    return None if evaluation is None else float(evaluation["accuracy"])


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _own_measures(metrics: dict[str, float]) -> str:
    """``eval/<name>_before`` and ``eval/<name>_after`` pairs as ``name a → b``."""
    names = sorted(
        k.removeprefix("eval/").removesuffix("_before")
        for k in metrics
        if k.startswith("eval/") and k.endswith("_before")
    )
    parts = [
        f"{n} {metrics[f'eval/{n}_before']:.3f} → {metrics[f'eval/{n}_after']:.3f}"
        for n in names
        if f"eval/{n}_after" in metrics
    ]
    return "; ".join(parts) or "–"
