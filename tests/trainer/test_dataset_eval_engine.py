"""A dataset stage (SFT, DPO, reward model) evaluates on the env with the engine its config
names: ``engine: vllm`` starts vLLM for the evaluation and gives it the trained weights.

The config tests need nothing; the vLLM test (tier ``vllm``) runs a short SFT stage on a
tiny random model vLLM serves and checks the evaluation after training sampled greedily
from the trained weights, not the starting ones (~30 s, most of it vLLM's start-up).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from palaestra.config import load_config, load_pipeline
from palaestra.errors import ConfigError
from palaestra.trainer.train_state import training_config

DATASET_STAGES = {
    "sft": ["stage=sft", "data.path=sft.jsonl"],
    "dpo": ["stage=dpo", "data.path=prefs.jsonl"],
    "reward_model": ["stage=reward_model", "data.path=prefs.jsonl"],
}


@pytest.mark.parametrize("stage", list(DATASET_STAGES))
def test_a_dataset_stage_takes_the_transformers_or_vllm_engine(stage):
    assert load_config(None, DATASET_STAGES[stage]).engine == "transformers"  # the default
    assert load_config(None, [*DATASET_STAGES[stage], "engine=vllm"]).engine == "vllm"


def test_a_dataset_stage_refuses_the_openai_engine_naming_the_field_and_the_fix():
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*DATASET_STAGES["sft"], "engine=openai"])
    message = str(caught.value)
    assert message.startswith("invalid config in the overrides: engine: 'openai' serves")
    assert "set engine to 'vllm' or 'transformers'" in message
    assert message.endswith("(got 'openai')")


def test_a_pipelines_shared_engine_reaches_its_dataset_stages(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "engine: vllm\n"
        "stages:\n"
        "  - {stage: sft, data: {path: sft.jsonl}}\n"
        "  - {stage: dpo, data: {path: prefs.jsonl}}\n"
        "  - {stage: grpo}\n"
    )
    assert [stage.engine for stage in load_pipeline(path)] == ["vllm", "vllm", "vllm"]

    path.write_text(path.read_text().replace("engine: vllm", "engine: openai"))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(sft\): engine: 'openai' serves"):
        load_pipeline(path, ["server.url=http://127.0.0.1:8000"])


def test_a_resumed_dataset_stage_may_change_its_engine_but_an_on_policy_stage_may_not():
    def checked(*overrides: str) -> dict:
        return training_config(load_config(None, list(overrides)).model_dump(mode="json"))

    sft = DATASET_STAGES["sft"]
    assert checked(*sft) == checked(*sft, "engine=vllm")  # it samples the evaluation only
    assert checked("stage=grpo") != checked("stage=grpo", "engine=vllm")  # and the rollouts


# --- the vLLM tier --------------------------------------------------------------------------

STEPS = 4
FLOAT32_TOLERANCE = 5e-4  # vLLM's float32 logprobs vs the learner's: ~1e-4 measured


@pytest.fixture
def sft_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": f"What is {a} + {b}?", "completion": f"\\boxed{{{a + b}}}"}
        for a in range(1, 9)
        for b in (2, 5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sampled_logprobs(model, trajectory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the tokens the engine sampled in ``trajectory``: the engine's logprob of each,
    ``model``'s (temperature 1), and ``model``'s highest logprob at that position."""
    sampled = [i for i, m in enumerate(trajectory.loss_mask) if m]  # token i from logits i-1
    ids_1T = torch.tensor([list(trajectory.token_ids)])
    with torch.no_grad():
        logprobs_TV = torch.log_softmax(model(ids_1T).logits[0].float(), dim=-1)
    at_NV = logprobs_TV[[i - 1 for i in sampled]]
    engine_N = torch.tensor([trajectory.logprobs[i] for i in sampled])
    return engine_N, at_NV[range(len(sampled)), ids_1T[0, sampled]], at_NV.max(dim=-1).values


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_sft_with_engine_vllm_evaluates_the_trained_weights_on_vllm(
    tmp_path, sft_data, vllm_tiny_model_dir, monkeypatch
):
    from palaestra.agent.engines.vllm import VLLMEngine
    from palaestra.models import load_model
    from palaestra.rundir import RunDir
    from palaestra.trainer.stages import common
    from palaestra.trainer.stages.sft import run_sft

    played = []  # (engine, episodes) of each evaluation

    async def spying_evaluate(pool, engine, *args, **kwargs):
        result, episodes = await evaluate(pool, engine, *args, **kwargs)
        played.append((engine, episodes))
        return result, episodes

    evaluate = common.evaluate
    monkeypatch.setattr(common, "evaluate", spying_evaluate)
    cfg = load_config(
        None,
        [
            "stage=sft",
            f"model={vllm_tiny_model_dir}",
            f"data.path={sft_data}",
            "data.batch_size=4",
            "data.eval_size=0",
            "engine=vllm",
            "engine_dtype=float32",
            "trainer.lr=0.01",
            f"trainer.steps={STEPS}",
            "eval.before=false",
            "eval.num_tasks=4",
            "eval.max_tokens=12",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "run", cfg.model_dump(mode="json"))
    result = run_sft(cfg, run)
    run.close()

    [(engine, episodes)] = played
    assert isinstance(engine, VLLMEngine)
    assert result.after is not None and result.after.num_tasks == len(episodes) == 4
    assert {t.policy_version for t in episodes} == {STEPS}  # sampled after the weight load
    trained, _ = load_model(result.checkpoint)
    starting, _ = load_model(vllm_tiny_model_dir)
    for t in episodes:
        engine_N, learner_N, best_N = sampled_logprobs(trained, t)
        assert torch.all(learner_N >= best_N - FLOAT32_TOLERANCE)  # greedy on these weights
        assert torch.allclose(engine_N, learner_N, rtol=0, atol=FLOAT32_TOLERANCE)
        # the check tells the weights apart: the starting ones score these tokens otherwise
        _, starting_N, _ = sampled_logprobs(starting, t)
        assert (engine_N - starting_N).abs().max() > 100 * FLOAT32_TOLERANCE
