"""Config loading: typed defaults, dotted overrides, and errors that name the field."""

import pytest

from palaestra.config import load_config
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


def test_bad_device_is_rejected():
    with pytest.raises(ConfigError, match="device"):
        load_config(None, ["device=tpu"])


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
