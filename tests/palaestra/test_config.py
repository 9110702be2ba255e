"""Config loading: typed defaults, dotted overrides, and errors that name the field."""

import pytest

from palaestra.config import load_config, read_config
from palaestra.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_applied(tmp_path):
    path = write(tmp_path, "model: tiny-random\nrollout:\n  group_size: 4\n")
    cfg = load_config(path, ["trainer.lr=3e-6", "grpo.scale_by_std=false", "env.kwargs.size=50"])
    assert cfg.model == "tiny-random"
    assert cfg.rollout.group_size == 4
    assert cfg.trainer.lr == pytest.approx(3e-6)
    assert cfg.grpo.scale_by_std is False
    assert cfg.env.kwargs == {"size": 50}


def test_unknown_key_names_its_dotted_path(tmp_path):
    path = write(tmp_path, "rollout:\n  group_sise: 4\n")
    with pytest.raises(ConfigError, match=r"rollout\.group_sise: unknown key"):
        load_config(path)


def test_out_of_range_value_names_field_and_bound(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.group_size: .*greater than or equal to 2"):
        load_config(None, ["rollout.group_size=1"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"grpo\.aggregation: .*'token-mean'"):
        load_config(None, ["grpo.aggregation=mean"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        load_config(None, ["trainer.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_engine_choice_and_the_vllm_engine_refuses_top_p():
    assert load_config(None, ["engine=vllm", "verify_every=1"]).engine == "vllm"
    with pytest.raises(ConfigError, match=r"engine: .*'transformers'"):
        load_config(None, ["engine=sglang"])
    with pytest.raises(ConfigError, match="top_p"):
        load_config(None, ["engine=vllm", "rollout.top_p=0.9"])


def test_per_turn_credit_refuses_what_it_cannot_combine_with():
    with pytest.raises(ConfigError, match="does not combine with advantage 'rloo'"):
        load_config(None, ["grpo.turn_credit=return_to_go", "grpo.advantage=rloo"])
    with pytest.raises(ConfigError, match="set kl_placement: loss"):
        load_config(None, ["grpo.turn_credit=return_to_go", "grpo.kl_coef=0.1"])
    config = load_config(
        None, ["grpo.turn_credit=return_to_go", "grpo.kl_coef=0.1", "grpo.kl_placement=loss"]
    )
    assert config.grpo.turn_credit == "return_to_go"


def test_the_openai_engine_needs_a_server_url():
    with pytest.raises(ConfigError, match=r"needs server\.url"):
        load_config(None, ["engine=openai"])
    config = load_config(None, ["engine=openai", "server.url=http://127.0.0.1:8000"])
    assert config.server.model_name is None  # the model's name is used


PIPELINE = """
model: tiny-random
trainer: {lr: 1.0e-5, steps: 4}
stages:
  - stage: sft
    data: {path: sft.jsonl}
    trainer: {steps: 2}
  - stage: dpo
    data: {path: prefs.jsonl}
    dpo: {beta: 0.2}
  - stage: grpo
"""


def test_pipeline_stages_merge_over_the_shared_keys(tmp_path):
    from palaestra.config import load_pipeline

    sft, dpo, grpo = load_pipeline(write(tmp_path, PIPELINE))
    assert [c.stage for c in (sft, dpo, grpo)] == ["sft", "dpo", "grpo"]
    assert sft.trainer.steps == 2 and sft.trainer.lr == pytest.approx(1e-5)  # merged, not replaced
    assert dpo.trainer.steps == 4 and dpo.dpo.beta == pytest.approx(0.2)
    assert all(c.model == "tiny-random" for c in (sft, dpo, grpo))
    # later stages do not re-evaluate what the stage before evaluated after training
    assert sft.eval.before and not dpo.eval.before and not grpo.eval.before


def test_pipeline_overrides_address_a_stage_by_index_or_name(tmp_path):
    from palaestra.config import load_pipeline

    path = write(tmp_path, PIPELINE)
    sft, dpo, grpo = load_pipeline(path, ["stages.1.dpo.loss=ipo", "stages.grpo.trainer.steps=9"])
    assert dpo.dpo.loss == "ipo" and grpo.trainer.steps == 9 and sft.trainer.steps == 2
    with pytest.raises(ConfigError, match="only 3 stages"):
        load_pipeline(path, ["stages.5.trainer.steps=1"])
    with pytest.raises(ConfigError, match="0 stages are named 'ppo'"):
        load_pipeline(path, ["stages.ppo.trainer.steps=1"])


def test_pipeline_errors_name_the_stage_and_field(tmp_path):
    from palaestra.config import load_pipeline

    bad = PIPELINE.replace("beta: 0.2", "beta: -1")
    with pytest.raises(ConfigError, match=r"stages\[1\] \(dpo\)[\s\S]*dpo\.beta"):
        load_pipeline(write(tmp_path, bad))
    with pytest.raises(ConfigError, match=r"set data\.path"):
        load_pipeline(write(tmp_path, PIPELINE.replace("    data: {path: sft.jsonl}\n", "")))
    with pytest.raises(ConfigError, match="sets model"):
        load_pipeline(write(tmp_path, PIPELINE + "    model: other\n"))
    with pytest.raises(ConfigError, match="is a pipeline of 3 stages"):
        load_config(write(tmp_path, PIPELINE))


# --- one config class per stage ------------------------------------------------------

STAGE_OVERRIDES = {
    "sft": ["stage=sft", "data.path=sft.jsonl"],
    "dpo": ["stage=dpo", "data.path=prefs.jsonl"],
    "reward_model": ["stage=reward_model", "data.path=prefs.jsonl"],
    "grpo": ["stage=grpo"],
    "ppo": ["stage=ppo"],
    "online_dpo": ["stage=online_dpo"],
}


def test_every_stage_has_a_config_class():
    from palaestra.config import STAGE_CONFIGS
    from palaestra.options import STAGES

    assert list(STAGE_CONFIGS) == list(STAGES) == list(STAGE_OVERRIDES)


@pytest.mark.parametrize("stage", list(STAGE_OVERRIDES))
def test_each_stage_loads_into_its_own_class(stage):
    from palaestra.config import STAGE_CONFIGS

    config = load_config(None, STAGE_OVERRIDES[stage])
    assert type(config) is STAGE_CONFIGS[stage] and config.stage == stage


def test_the_stage_classes_hold_only_the_sections_their_stage_uses():
    from palaestra.config import (
        DPOStage,
        GRPOStage,
        OnlineDPOStage,
        PPOStage,
        RewardModelStage,
        SFTStage,
    )

    shared = {"stage", "model", "device", "seed", "engine_dtype", "env", "rollout"}
    shared |= {"trainer", "eval", "run"}
    dataset = shared | {"data", "engine"}  # the engine of its env evaluation
    on_policy = shared | {"engine", "server", "verify_every", "verify_tolerance", "lora"}
    assert set(RewardModelStage.model_fields) == dataset
    assert set(SFTStage.model_fields) == dataset | {"lora"}
    assert set(DPOStage.model_fields) == dataset | {"dpo", "lora"}
    assert set(GRPOStage.model_fields) == on_policy | {"grpo"}
    assert set(PPOStage.model_fields) == on_policy | {"grpo", "ppo"}
    assert set(OnlineDPOStage.model_fields) == on_policy | {"grpo", "dpo"}


def test_a_config_without_a_stage_is_grpo():
    from palaestra.config import GRPOStage

    assert type(load_config(None)) is GRPOStage


def test_a_wrong_stage_lists_the_stages():
    allowed = "sft, dpo, reward_model, grpo, ppo, online_dpo"
    with pytest.raises(ConfigError, match=rf"stage: must be one of {allowed} \(got 'rl'\)"):
        load_config(None, ["stage=rl"])
    with pytest.raises(ConfigError, match=rf"stage: must be one of {allowed} \(got \[1\]\)"):
        load_config(None, ["stage=[1]"])


def test_a_key_of_another_stage_names_the_stages_that_take_it():
    with pytest.raises(
        ConfigError,
        match=r"overrides: ppo: stage 'grpo' does not take this key \(stages that take it: ppo\)",
    ):
        load_config(None, ["ppo.gamma=0.5"])
    with pytest.raises(
        ConfigError,
        match=r"verify_every: stage 'sft' does not take this key \(stages that take it: grpo, ppo, online_dpo\)",
    ):
        load_config(None, [*STAGE_OVERRIDES["sft"], "verify_every=1"])
    with pytest.raises(ConfigError, match=r"data: stage 'grpo' does not take this key"):
        load_config(None, ["data.path=sft.jsonl"])


def test_error_paths_start_at_the_section_not_at_the_stage_tag():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["trainer.lr=-1"])
    assert str(caught.value) == (
        "invalid config in the overrides: trainer.lr: Input should be greater than 0 (got -1)"
    )
    assert "grpo.trainer" not in str(caught.value)


def test_online_dpo_reads_only_the_dynamic_sampling_of_the_grpo_section():
    config = load_config(None, ["stage=online_dpo", "grpo.dynamic_sampling=true"])
    assert config.grpo.dynamic_sampling is True
    with pytest.raises(ConfigError, match=r"online_dpo reads only .*remove grpo\.kl_coef"):
        load_config(None, ["stage=online_dpo", "grpo.kl_coef=0.1"])
    with pytest.raises(ConfigError, match=r"dpo\.loss kto takes labelled answers"):
        load_config(None, ["stage=online_dpo", "dpo.loss=kto"])


def test_a_stage_resolves_its_precision(monkeypatch):
    from palaestra import models

    monkeypatch.setattr(models, "native_bfloat16", lambda device: False)
    config = load_config(None, ["trainer.dtype=float32"])
    assert config.precision() == models.Precision(
        "cpu", "float32", "float32", native_bfloat16=False, from_auto=True
    )
    assert load_config(None, STAGE_OVERRIDES["sft"]).precision().engine == "float32"


SHARED_DATA = """
model: tiny-random
data: {path: sft.jsonl, batch_size: 4}
stages:
  - stage: sft
  - stage: dpo
    data: {path: prefs.jsonl}
  - stage: grpo
"""


def test_a_shared_section_goes_only_to_the_stages_that_take_it(tmp_path):
    from palaestra.config import load_pipeline

    sft, dpo, grpo = load_pipeline(write(tmp_path, SHARED_DATA))
    assert sft.data.path == tmp_path / "sft.jsonl" and sft.data.batch_size == 4
    assert dpo.data.path == tmp_path / "prefs.jsonl" and dpo.data.batch_size == 4
    assert grpo.stage == "grpo" and "data" not in type(grpo).model_fields


def test_a_shared_key_that_no_stage_of_the_pipeline_takes_is_an_error(tmp_path):
    from palaestra.config import load_pipeline

    with pytest.raises(
        ConfigError,
        match=r"no stage of this pipeline takes the shared key\(s\) 'ppo' \(stages that take it: ppo\)",
    ):
        load_pipeline(write(tmp_path, PIPELINE + "ppo: {gamma: 0.9}\n"))
    with pytest.raises(ConfigError, match=r"'trainr' \(no stage takes it: check the spelling\)"):
        load_pipeline(write(tmp_path, PIPELINE + "trainr: {steps: 1}\n"))


def test_a_bare_off_on_the_command_line_turns_importance_sampling_off():
    # YAML parses the override value `off` as false; the option's name for it is "off"
    assert load_config(None, ["grpo.importance_sampling=off"]).grpo.importance_sampling == "off"
    with pytest.raises(ConfigError, match="importance_sampling"):
        load_config(None, ["grpo.importance_sampling=true"])


# --- values found bad at load, before a run directory or a model ---------------------


def _section_classes():
    """Every config model: the sections and the stage classes (``palaestra.config``)."""
    from palaestra.config_sections import Section

    found, todo = [], [Section]
    while todo:
        cls = todo.pop()
        found += cls.__subclasses__()
        todo += cls.__subclasses__()
    return sorted(set(found), key=lambda cls: cls.__name__)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_field_of_any_section_takes_inf_or_nan(value):
    from pydantic import ValidationError

    for cls in _section_classes():
        for name in cls.model_fields:
            with pytest.raises(ValidationError) as caught:
                cls.model_validate({name: value})
            assert any(err["loc"][0] == name for err in caught.value.errors()), (cls, name)


FINITE = "Input should be a finite number"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.lr=.inf"], f"trainer.lr: {FINITE} (got inf)"),
        (["trainer.lr=inf"], f"trainer.lr: {FINITE} (got 'inf')"),  # a string read as a float
        (["trainer.max_grad_norm=.inf"], f"trainer.max_grad_norm: {FINITE}"),
        (["trainer.betas=[0.9, .nan]"], f"trainer.betas[1]: {FINITE}"),
        (["rollout.temperature=.nan"], f"rollout.temperature: {FINITE}"),
        (["eval.temperature=.inf"], f"eval.temperature: {FINITE}"),
        (["grpo.is_cap=.inf"], f"grpo.is_cap: {FINITE}"),
        (["grpo.kl_coef=.nan"], f"grpo.kl_coef: {FINITE}"),
        ([*STAGE_OVERRIDES["dpo"], "dpo.beta=.inf"], f"dpo.beta: {FINITE}"),
        (["env.kwargs.size=.inf"], "env.kwargs: size is inf: give the env a finite number"),
    ],
)
def test_inf_and_nan_fail_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert message in str(caught.value)


def test_a_key_given_twice_in_a_yaml_file_names_the_key_and_its_lines(tmp_path):
    text = "model: tiny-random\ntrainer:\n  lr: 1.0e-5\nrollout: {group_size: 4}\ntrainer:\n  steps: 3\n"
    with pytest.raises(ConfigError, match=r"key 'trainer' appears twice .*\(lines 2 and 5\)"):
        load_config(write(tmp_path, text))
    nested = PIPELINE.replace("trainer: {steps: 2}", "trainer: {steps: 2, steps: 3}")
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice .*\(lines 7 and 7\)"):
        load_config(write(tmp_path, nested))
    with pytest.raises(ConfigError, match=r"override 'trainer=\{lr: 1, lr: 2\}': .*'lr' appears"):
        load_config(None, ["trainer={lr: 1, lr: 2}"])
    # a YAML merge key is not a duplicate: the mapping overrides what it merges
    merged = "base: &base {lr: 1.0e-5, steps: 3}\ntrainer:\n  <<: *base\n  steps: 5\n"
    assert read_config(write(tmp_path, merged))["trainer"] == {"lr": 1.0e-5, "steps": 5}


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "..", ".", ""])
def test_the_run_name_is_one_folder_inside_the_output_dir(name):
    with pytest.raises(ConfigError, match=r"run\.name: .*must be one folder name"):
        load_config(None, [f"run.name='{name}'"])
    assert load_config(None, ["run.name=math-1"]).run.name == "math-1"


def test_seed_and_adam_betas_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"seed: Input should be greater than or equal to 0"):
        load_config(None, ["seed=-1"])
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["trainer.betas=[2, -1]"])
    assert "(2 problems):\n  trainer.betas[0]: Input should be less than 1 (got 2)" in str(
        caught.value
    )
    assert "\n  trainer.betas[1]: Input should be greater than or equal to 0" in str(caught.value)
    assert load_config(None, ["trainer.betas=[0, 0.999]"]).trainer.betas == (0, 0.999)


@pytest.mark.parametrize("device", ["tpu", "cuda:abc", "cuda:-1", "cuda:", "cuda0", "CPU"])
def test_a_device_that_is_not_cpu_cuda_or_cuda_n_is_refused(device):
    with pytest.raises(ConfigError, match=r"device: .*'cpu', 'cuda' or 'cuda:N'"):
        load_config(None, [f"device='{device}'"])


def test_cuda_devices_are_spelled_cuda_or_cuda_n():
    for device in ("cpu", "cuda", "cuda:1"):
        assert load_config(None, [f"device={device}"]).device == device


@pytest.mark.parametrize(
    ("gpus", "device", "message"),
    [
        (0, "cuda", "device: 'cuda', but torch finds no CUDA device on this machine"),
        (1, "cuda:3", "device: 'cuda:3', but this machine has 1 CUDA device(s)"),
    ],
)
def test_train_refuses_a_cuda_device_the_machine_lacks_before_the_run_dir(
    tmp_path, monkeypatch, capsys, gpus, device, message
):
    import torch

    from palaestra.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    runs = tmp_path / "runs"
    config = write(tmp_path, "model: tiny-random\n")
    assert main(["train", str(config), f"device={device}", f"run.output_dir={runs}"]) == 2
    assert message in capsys.readouterr().err
    assert not runs.exists()


def test_the_sample_budget_leaves_room_for_a_prompt_beside_max_tokens():
    with pytest.raises(
        ConfigError, match=r"rollout\.max_total_tokens: .*must exceed rollout\.max_tokens \(128\)"
    ):
        load_config(None, ["rollout.max_total_tokens=5"])
    with pytest.raises(ConfigError, match=r"rollout\.max_total_tokens: .*\(got 8\)"):
        load_config(None, ["rollout.max_tokens=8", "rollout.max_total_tokens=8"])
    config = load_config(None, ["rollout.max_tokens=8", "rollout.max_total_tokens=9"])
    assert config.rollout.max_total_tokens == 9


def test_a_check_across_fields_names_the_field_to_change():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["stage=sft"])
    assert str(caught.value) == (
        "invalid config in the overrides: data.path: stage 'sft' trains on a dataset: set "
        "data.path to a JSON-lines file"
    )
    with pytest.raises(ConfigError, match=r"overrides: grpo\.turn_credit: turn_credit"):
        load_config(None, ["grpo.turn_credit=return_to_go", "grpo.advantage=rloo"])
    with pytest.raises(ConfigError, match=r"overrides: env\[1\]\.idd: unknown key"):
        load_config(None, ["env=[{id: a}, {idd: b}]"])


def test_relative_paths_in_a_config_file_are_read_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    path = write(
        folder,
        "stage: ppo\nmodel: ckpt\nppo: {critic_model: ../critic}\n"
        "env: [{id: a, reward_model: {path: rm}}, {id: b}]\n"
        "eval: {envs: [{id: c, reward_model: {path: /abs/rm}}]}\nrun: {output_dir: out}\n",
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.model == str(folder / "ckpt")
    assert config.ppo.critic_model == str(tmp_path / "critic")
    assert config.env[0].reward_model.path == str(folder / "rm")
    assert config.eval.envs[0].reward_model.path == "/abs/rm"  # absolute: as given
    assert str(config.run.output_dir) == "out"  # the working directory's
    assert load_config(path, ["model=tiny-random"]).model == "tiny-random"  # a name
    assert load_config(path, ["model=mine"]).model == "mine"  # typed here: the cwd's
    path.write_text("model: smollm2-135m\ndata: {path: d.jsonl}\nstage: sft\n")
    config = load_config(path)
    assert config.model == "smollm2-135m" and config.data.path == folder / "d.jsonl"
    # what a run writes lies in run.output_dir, under the working directory, as it does
    path.write_text(
        "stage: ppo\nmodel: tiny-random\nrun: {output_dir: out}\n"
        "env: {id: a, reward_model: {path: out/rlhf/1-reward_model/checkpoints/final}}\n"
    )
    rm = load_config(path).env.reward_model.path
    assert rm == "out/rlhf/1-reward_model/checkpoints/final"
    path.write_text("stage: sft\nmodel: tiny-random\nrun: {output_dir: .}\ndata: {path: d}\n")
    assert load_config(path).data.path == folder / "d"  # "." holds no exception
