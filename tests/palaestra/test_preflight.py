"""Fail fast: every input that can be checked without a model is refused before a run
directory is made or a model loaded, with one ``error:`` line naming the field, and a run
that fails to start leaves nothing behind.

The commands run in process (``palaestra.cli.main``). The model of the bad-input cases is a
directory whose ``config.json`` names no model type: it passes the preflight's model check
(which reads no weights), and loading it fails with "cannot load the model". So a case
that ends on its own field's message was refused before any model was loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from palaestra.cli import main
from palaestra.config import load_pipeline
from palaestra.preflight import check_stages

SFT_LINE = {"prompt": "1 + 1 =", "completion": "2"}
PAIR_LINE = {"prompt": "1 + 1 =", "chosen": "2", "rejected": "3"}


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """``tmp_path`` with ``broken/`` (an unloadable model), and ``conf/data/`` with a good SFT
    and preference file beside where the configs go (``conf/``)."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    data = tmp_path / "conf" / "data"
    data.mkdir(parents=True)
    (data / "sft.jsonl").write_text(json.dumps(SFT_LINE) + "\n")
    (data / "prefs.jsonl").write_text(json.dumps(PAIR_LINE) + "\n")
    return tmp_path


def refused(capsys, argv: list[str]) -> str:
    """Run the command, expect exit status 2 and exactly one ``error:`` line; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def train_refused(capsys, files: Path, config: str, *overrides: str) -> str:
    """``palaestra train`` on ``config`` (written to ``conf/c.yaml``) with the broken model:
    refused, and no run directory (not even the output folder) made."""
    path = files / "conf" / "c.yaml"
    path.write_text(f"model: {files / 'broken'}\n{config}")
    runs = files / "runs"
    error = refused(capsys, ["train", str(path), f"run.output_dir={runs}", *overrides])
    assert not runs.exists()
    return error


SFT = "stage: sft\ndata: {path: data/sft.jsonl}\n"
PIPELINE = """
stages:
  - stage: sft
    data: {path: data/sft.jsonl}
  - stage: dpo
    data: {path: data/bad.jsonl}
  - stage: grpo
"""


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("", ["env.id=palaestra/Nope-v0"], "error: env.id: No palaestra environment is registered"),
        (
            "",
            ["env.id=palaestra/ToolLookup-v0", "env.kwargs.colour=red"],
            "error: env.kwargs: palaestra/ToolLookup-v0 cannot be built on its 'train' split "
            "with kwargs {'colour': 'red'}: TypeError",
        ),
        (
            "env: [{id: palaestra/Math-v0}, {id: palaestra/ToolLookup-v0, kwargs: {num_items: 1}}]\n",
            [],
            "error: env[1].kwargs: palaestra/ToolLookup-v0 cannot be built",
        ),
        (  # an eval-only env, built on its test split
            "eval: {envs: [{id: palaestra/HumanEval-v0, kwargs: {sandbox: nope}}]}\n",
            [],
            "error: eval.envs[0].kwargs: palaestra/HumanEval-v0 cannot be built on its 'test'",
        ),
        (
            "",
            ["env.id=palaestra/HumanEval-v0"],
            "error: env: palaestra/HumanEval-v0 cannot be built on its 'train' split: "
            "EnvConfigError: HumanEval is an evaluation set",
        ),
        (
            SFT,
            ["data.path=missing.jsonl"],
            "error: data.path: dataset missing.jsonl does not exist or is not a file",
        ),
        (SFT, ["data.eval_size=1"], "error: data.eval_size: "),
        (
            "stage: dpo\ndata: {path: data/labelled.jsonl}\n",
            [],
            "/conf/data/labelled.jsonl holds unpaired answers (prompt, completion, label)",
        ),
        ("", ["device=cuda:99"], "error: device: 'cuda:99', but "),
        ("", ["device=cuda:abc"], "/conf/c.yaml: device: must be 'cpu', 'cuda' or 'cuda:N'"),
        ("", ["seed=-1"], "/conf/c.yaml: seed: Input should be greater than or equal to 0"),
        ("", ["trainer.betas=[2, -1]"], "(2 problems):"),
        ("", ["trainer.lr=.inf"], "trainer.lr: Input should be a finite number"),
        ("trainer: {lr: 1.0e-5}\ntrainer: {steps: 2}\n", [], "key 'trainer' appears twice"),
        ("", ["run.name=../x"], "run.name: must be one folder name"),
        ("", ["rollout.max_total_tokens=64"], "rollout.max_total_tokens: must exceed"),
        (
            "rollout: {max_tokens: 8, max_total_tokens: 64}\neval: {max_tokens: 64}\n",
            [],
            "eval.max_tokens: 64 does not fit in rollout.max_total_tokens (64)",
        ),
        (
            "env: {reward_model: {path: rm/checkpoints/final}}\n",
            [],
            "error: env.reward_model.path: ",
        ),
        ("stage: ppo\nppo: {critic_model: critic}\n", [], "error: ppo.critic_model: model '"),
    ],
    ids=[
        "unknown env id",
        "unknown env kwarg",
        "bad kwarg of a mixture's env",
        "bad kwarg of an eval-only env",
        "eval-only env trained on",
        "missing dataset",
        "eval_size leaves nothing",
        "unpaired answers for sigmoid DPO",
        "absent cuda device",
        "misspelt device",
        "negative seed",
        "betas out of range",
        "infinite lr",
        "duplicate YAML key",
        "run name outside output_dir",
        "no room to sample",
        "no room to sample at eval",
        "missing reward model",
        "missing critic",
    ],
)
def test_a_bad_input_is_one_error_line_before_any_run_dir_or_model(
    capsys, files, config, overrides, expected
):
    data = files / "conf" / "data"
    (data / "labelled.jsonl").write_text(json.dumps({**SFT_LINE, "label": True}) + "\n")
    assert expected in train_refused(capsys, files, config, *overrides)


def test_a_missing_model_is_named_with_where_a_relative_path_is_read_from(capsys, files):
    error = train_refused(capsys, files, "", "model=no/such/model")
    assert error.startswith("error: model: model 'no/such/model' not found")
    assert "read from the file's folder" in error and "from the working directory" in error


VLLM_PIPELINE = """
engine: vllm
stages:
  - stage: sft
    data: {path: data/sft.jsonl}
  - stage: grpo
"""


@pytest.mark.parametrize(
    ("config", "overrides", "where"),
    [
        (VLLM_PIPELINE, [], "stages[0] (sft): "),  # its evaluation after training
        (
            VLLM_PIPELINE,
            ["stages.sft.eval.before=false", "stages.sft.eval.after=false"],
            "stages[1] (grpo): ",
        ),
        ("", ["engine=vllm"], ""),
    ],
    ids=["dataset stage that evaluates", "dataset stage that does not", "on-policy stage"],
)
def test_a_stage_that_starts_vllm_needs_it_installed(
    capsys, files, monkeypatch, config, overrides, where
):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not found, not importable
    error = train_refused(capsys, files, config, *overrides)
    assert error.startswith(f"error: {where}engine: 'vllm', but vLLM is not installed: ")
    assert "make setup-vllm" in error and error.endswith("or set engine=transformers")


def test_a_reward_model_stage_starts_no_vllm(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    path = files / "conf" / "c.yaml"
    path.write_text("stage: reward_model\nengine: vllm\ndata: {path: data/prefs.jsonl}\n")
    check_stages(load_pipeline(path))  # no env evaluation, so no engine: not refused


def test_a_bad_line_of_a_later_pipeline_stage_is_found_before_the_first_stage(capsys, files):
    bad = files / "conf" / "data" / "bad.jsonl"
    bad.write_text(json.dumps(PAIR_LINE) + "\n" + '{"prompt": "x", "chosen": "y"\n')
    error = train_refused(capsys, files, PIPELINE)
    assert error == (
        f"error: stages[1] (dpo): data.path: {bad}:2: not valid JSON (Expecting ',' delimiter "
        'at column 1). Each line must be one JSON object, e.g. {"prompt": "...", "chosen": '
        '"...", "rejected": "..."}.'
    )


def test_a_dataset_line_without_the_fields_of_its_stage_names_file_and_line(capsys, files):
    bad = files / "conf" / "data" / "bad.jsonl"
    bad.write_text(json.dumps(SFT_LINE) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    error = train_refused(capsys, files, SFT, f"data.path={bad}")
    assert error.startswith(f'error: data.path: {bad}:2: an SFT line needs "messages"')


def test_paths_in_a_config_are_read_from_its_folder_and_overrides_from_the_cwd(
    files, tmp_path, monkeypatch
):
    config = files / "conf" / "c.yaml"
    config.write_text("model: tiny-random\n" + PIPELINE.replace("bad.jsonl", "prefs.jsonl"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sft, dpo, _ = load_pipeline(config)
    assert sft.data.path == files / "conf" / "data" / "sft.jsonl"
    assert dpo.data.path == files / "conf" / "data" / "prefs.jsonl"
    check_stages([sft, dpo])  # both found, every line read
    # a value typed on the command line is read from where it was typed
    (elsewhere / "mine.jsonl").write_text(json.dumps(SFT_LINE) + "\n")
    sft, _, _ = load_pipeline(config, ["stages.sft.data.path=mine.jsonl"])
    assert sft.data.path == Path("mine.jsonl")
    check_stages([sft])
    # the output folder stays relative to the working directory
    assert not sft.run.output_dir.is_absolute()


EVAL = ["eval", "--num-tasks", "1"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--num-tasks", "0"], "error: palaestra eval: --num-tasks: Input should be greater"),
        (["--samples", "0"], "error: palaestra eval: --samples: "),
        (["--max-tokens", "0"], "error: palaestra eval: --max-tokens: "),
        (["--temperature", "nan"], "error: palaestra eval: --temperature: "),
        (["--device", "cuda:abc"], "error: palaestra eval: --device: "),
        (["--env", "palaestra/Nope-v0"], "error: --env: No palaestra environment"),
        (["--env-kwargs", '{"sizee": 3}'], "error: --env-kwargs: palaestra/Math-v0 cannot be"),
        (["--model", "no-such-model"], "error: --model: model 'no-such-model' not found"),
    ],
)
def test_eval_refuses_bad_flags_before_loading_the_model(capsys, files, argv, expected):
    out = files / "evals"
    error = refused(capsys, [*EVAL, "--model", str(files / "broken"), "--out", str(out), *argv])
    assert error.startswith(expected)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--device", "cuda:abc"], "error: palaestra collect: --device: "),
        (["--max-turns", "0"], "error: palaestra collect: --max-turns: "),
        (["--episodes", "0"], "error: --episodes: must be >= 1 (got 0)"),
        (["--env-kwargs", "[1]"], "error: --env-kwargs: must be a JSON object"),
        (["--env", "palaestra/Nope-v0"], "error: --env: No palaestra environment"),
        (["--env-kwargs", '{"num_items": 0}'], "error: --env-kwargs: palaestra/ToolLookup-v0"),
    ],
)
def test_collect_refuses_bad_flags_before_loading_the_model(capsys, files, argv, expected):
    out = files / "collected.jsonl"
    base = ["collect", "--env", "palaestra/ToolLookup-v0", "--policy", str(files / "broken")]
    error = refused(capsys, [*base, "--episodes", "1", "--out", str(out), *argv])
    assert error.startswith(expected)
    assert not out.exists()


def test_a_run_that_fails_to_load_its_model_leaves_no_run_directory(capsys, files):
    runs = files / "runs" / "nested"
    config = files / "conf" / "c.yaml"
    for text in ("", SFT, PIPELINE.replace("bad.jsonl", "prefs.jsonl")):  # one stage, pipelines
        config.write_text(f"model: {files / 'broken'}\n{text}")
        error = refused(capsys, ["train", str(config), f"run.output_dir={runs}", "run.name=x"])
        assert error.startswith(f"error: cannot load the model in {files / 'broken'}")
        assert not (files / "runs").exists()  # the folders it made are gone too


def test_a_pipeline_stage_that_fails_to_start_is_marked_failed_not_running(capsys, files):
    config = files / "conf" / "c.yaml"
    config.write_text(
        "model: tiny-random\neval: {before: false, after: false}\n"
        "trainer: {steps: 1, micro_batch_size: 2}\nrun: {progress: false, name: p}\n"
        "stages:\n  - {stage: sft, data: {path: data/sft.jsonl, batch_size: 1}}\n"
        f"  - {{stage: ppo, ppo: {{critic_model: {files / 'broken'}}}}}\n"
    )
    runs = files / "runs"
    with pytest.raises(ValueError, match="Unrecognized model"):  # the critic's loader's error
        main(["train", str(config), f"run.output_dir={runs}"])
    state = json.loads((runs / "p" / "pipeline.json").read_text())
    assert [(s["name"], s["status"]) for s in state["stages"]] == [
        ("1-sft", "done"),
        ("2-ppo", "failed"),
    ]
    assert "Unrecognized model" in state["stages"][1]["error"]
    assert not (runs / "p" / "2-ppo").exists()
    assert (runs / "p" / "1-sft" / "checkpoints" / "final").is_dir()
