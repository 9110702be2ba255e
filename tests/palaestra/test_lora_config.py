"""The ``lora`` section: its ranges fail at load naming the field, engines that cannot take
an adapter are refused, a pipeline shares it, and a LoRA pipeline chains its stages."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from palaestra.config import load_config, load_pipeline
from palaestra.errors import ConfigError
from palaestra.models import resolve_model
from palaestra.pipeline import run_pipeline


def test_no_lora_section_trains_the_full_model_and_an_empty_one_takes_the_defaults():
    assert load_config(None, []).lora is None
    lora = load_config(None, ["lora={}"]).lora
    assert lora is not None
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules) == (16, 32, 0, "all-linear")
    named = load_config(None, ["lora={rank: 4, target_modules: [q_proj, v_proj]}"]).lora
    assert named is not None and named.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rank=0", "lora.rank: Input should be greater than or equal to 1"),
        ("lora.alpha=0", "lora.alpha: Input should be greater than or equal to 1"),
        ("lora.dropout=1", "lora.dropout: Input should be less than 1"),
        ("lora.dropout=-0.1", "lora.dropout: Input should be greater than or equal to 0"),
        ("lora.target_modules=[]", "lora.target_modules: list at least one module name"),
        ("lora.target_modules=[q_proj, q_proj]", "lora.target_modules: names a module twice"),
        ("lora.target_modules=attention", "lora.target_modules: must be 'all-linear' or a list"),
        ("lora.ranks=4", "lora.ranks: unknown key"),
    ],
)
def test_a_bad_lora_value_fails_at_load_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["engine=vllm"],
        ["engine=openai", "server.url=http://127.0.0.1:8000"],
        ["stage=sft", "data.path=x.jsonl", "engine=vllm"],
    ],
)
def test_an_engine_without_adapter_sync_is_refused_with_lora(overrides):
    with pytest.raises(ConfigError, match=r"engine: .*adapter sync to vLLM is not built"):
        load_config(None, ["lora.rank=4", *overrides])
    load_config(None, overrides)  # fine without lora


def test_a_reward_model_stage_takes_no_lora_and_a_pipeline_shares_it_with_the_others(tmp_path):
    with pytest.raises(ConfigError, match="lora: stage 'reward_model' does not take this key"):
        load_config(None, ["stage=reward_model", "data.path=x.jsonl", "lora.rank=4"])
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "lora: {rank: 4}\ndata: {path: x.jsonl}\n"
        "stages: [{stage: sft}, {stage: reward_model}, {stage: grpo}]\n"
    )
    sft, reward_model, grpo = load_pipeline(path)
    assert sft.lora == grpo.lora and sft.lora is not None and sft.lora.rank == 4
    assert "lora" not in type(reward_model).model_fields


SFT_THEN_GRPO = """
model: tiny-random
lora: {rank: 4, alpha: 8}
env: {id: palaestra-test/OddLength-v0}
rollout: {tasks_per_step: 2, group_size: 2, max_tokens: 8}
trainer: {steps: 2, lr: 0.02, micro_batch_size: 4, dtype: float32}
engine_dtype: float32
eval: {before: false, after: false}
run: {progress: false, log_trajectories: 0}
data: {path: sft.jsonl, batch_size: 4}
stages:
  - stage: sft
  - stage: grpo
"""


def test_a_lora_pipeline_trains_each_stage_on_the_merged_model_of_the_one_before(tmp_path):
    rows = [{"prompt": f"What is {a} + 2?", "completion": str(a + 2)} for a in range(8)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = tmp_path / "pipeline.yaml"
    path.write_text(SFT_THEN_GRPO)
    stages = load_pipeline(path)
    assert [s.lora.rank if s.lora else None for s in stages] == [4, 4]

    sft, grpo = run_pipeline(stages, tmp_path / "run", {})

    start = load_file(resolve_model("tiny-random") / "model.safetensors")
    after_sft = load_file(f"{sft['checkpoint']}/model.safetensors")
    after_grpo = load_file(f"{grpo['checkpoint']}/model.safetensors")
    assert after_sft.keys() == after_grpo.keys() == start.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not (after_sft[q] == start[q]).all() and not (after_grpo[q] == after_sft[q]).all()
