"""LoRA in the learner (``trainer.adapters``): fresh adapters leave the model as it was,
steps train the adapters alone, the reference is the base with adapters off (no copy),
the transformers engine samples with the adapter it was sent, and checkpoints hold the
merged model plus the adapter, so stages chain and resume exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from palaestra.agent.engines import TransformersEngine
from palaestra.agent.errors import EngineError
from palaestra.config import LoRAConfig, load_config
from palaestra.errors import ConfigError
from palaestra.models import load_model, resolve_model
from palaestra.rundir import RunDir
from palaestra.trainer import adapters
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.errors import WeightSyncError
from palaestra.trainer.learner import Learner, OptimSettings, policy_forward, token_logprobs
from palaestra.trainer.losses import sft_loss
from palaestra.trainer.stages import common
from palaestra.trainer.stages.common import reference_policy
from palaestra.trainer.stages.grpo import run_grpo
from palaestra.trainer.stages.sft import run_sft
from palaestra.trainer.train_state import latest_state, state_step
from palaestra.trainer.weight_sync import learner_logprobs, verify_engine_weights

LORA = LoRAConfig(rank=4, alpha=8)
IDS_BT = torch.tensor([[5, 6, 7, 10, 11, 12, 13, 14], [5, 6, 20, 21, 22, 23, 24, 25]])
BATCH = TokenBatch(
    input_ids_BT=IDS_BT,
    attention_mask_BT=torch.ones_like(IDS_BT),
    loss_mask_BT=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2, dtype=torch.float32),
)
PROBE = list(range(100, 140))


def base_and_adapted():
    """tiny-random, and a second load of it wrapped with fresh adapters."""
    base, _ = load_model("tiny-random")
    model, _ = load_model("tiny-random")
    return base, adapters.with_adapters(model, LORA)


def sft_learner(model, lr=0.05):
    return Learner(model, OptimSettings(lr=lr, micro_batch_size=2), forward=policy_forward(1.0))


def nll(batch, logprobs_BT, *, num_tokens, num_seqs):
    return sft_loss(logprobs_BT, batch.loss_mask_BT, num_tokens=num_tokens)


def train_steps(learner, steps=3):
    return [learner.step(BATCH, nll)["loss"] for _ in range(steps)]


def base_weights(model):
    return {n: t.clone() for n, t in model.state_dict().items() if adapters.ADAPTER_MARK not in n}


def test_fresh_adapters_score_exactly_as_the_base_model():
    base, model = base_and_adapted()

    assert torch.equal(token_logprobs(model, BATCH), token_logprobs(base, BATCH))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_A" in n or "lora_B" in n for n in trained)
    assert len(trained) == 2 * 7 * base.config.num_hidden_layers  # all-linear: 7 projections


def test_named_target_modules_alone_get_adapters():
    model, _ = load_model("tiny-random")
    lora = LoRAConfig(rank=2, alpha=2, target_modules=["q_proj", "v_proj"])

    adapted = adapters.with_adapters(model, lora)

    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in adapters.adapter_weights(adapted)}
    assert names == {"q_proj", "v_proj"}
    assert adapted.peft_config["default"].r == 2


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft's, on lm_head
@pytest.mark.parametrize(
    ("modules", "message"),
    [(["qproj"], "qproj"), (["q_proj", "lm_head"], "shares its weight with the input")],
)
def test_target_modules_the_model_cannot_take_are_refused_naming_the_field(modules, message):
    model, _ = load_model("tiny-random")
    lora = LoRAConfig(rank=2, alpha=2, target_modules=modules)

    with pytest.raises(ConfigError, match=f"lora.target_modules: .*{message}"):
        adapters.with_adapters(model, lora)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_lora_step_trains_only_the_adapters_and_lowers_the_loss(checkpointing):
    _, model = base_and_adapted()
    frozen = base_weights(model)
    settings = OptimSettings(lr=0.05, micro_batch_size=2, gradient_checkpointing=checkpointing)
    learner = Learner(model, settings, forward=policy_forward(1.0))

    losses = train_steps(learner)

    assert losses[-1] < losses[0]
    assert all(torch.equal(t, frozen[n]) for n, t in base_weights(model).items())
    moved = dict(learner.named_weights())
    assert moved and all(adapters.ADAPTER_MARK in n for n in moved)
    assert any(torch.count_nonzero(t) for n, t in moved.items() if "lora_B" in n)


def test_the_reference_is_the_base_with_adapters_off_and_holds_no_copy(monkeypatch):
    base, model = base_and_adapted()
    learner = sft_learner(model)
    train_steps(learner)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("copied the model"))

    reference = reference_policy(model)

    assert {id(p) for p in reference.parameters()} == {id(p) for p in model.parameters()}
    assert torch.equal(learner.score(BATCH, model=reference), learner.score(BATCH, model=base))
    assert not torch.allclose(learner.score(BATCH), learner.score(BATCH, model=base), atol=1e-4)
    # scoring the reference switched the adapters off only while it ran: they still train
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    before = {n: t.clone() for n, t in learner.named_weights()}
    train_steps(learner, 1)
    assert any(not torch.equal(t, before[n]) for n, t in learner.named_weights())


def test_the_merged_weights_are_peft_s_merge_and_leave_the_model_as_it_was():
    _, model = base_and_adapted()
    train_steps(sft_learner(model))
    before = {n: t.clone() for n, t in model.state_dict().items()}

    merged = adapters.merged_state_dict(model)

    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[n], expected[n], atol=1e-7) for n in expected)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


async def test_the_engine_samples_with_the_adapter_it_was_sent():
    base, model = base_and_adapted()
    learner = sft_learner(model)
    engine = TransformersEngine(
        common.frozen_copy(model), eos_token_ids=[2], pad_token_id=2, dtype="float32"
    )
    train_steps(learner)
    with pytest.raises(WeightSyncError):  # the engine still holds the fresh adapter
        await verify_engine_weights(engine, model, PROBE, tolerance=1e-4)

    await engine.update_weights(learner.named_weights(), version=1)

    engine_N = torch.tensor(await engine.score(PROBE))
    assert torch.allclose(engine_N, learner_logprobs(model, PROBE), atol=1e-5)
    assert (engine_N - learner_logprobs(base, PROBE)).abs().max() > 1e-3
    await verify_engine_weights(engine, model, PROBE, tolerance=1e-4)
    one_missing = list(learner.named_weights())[1:]
    with pytest.raises(EngineError, match="missing 1 parameters"):
        await engine.update_weights(one_missing, version=2)


def test_a_checkpoint_holds_the_merged_model_and_the_adapter(tmp_path, tokenizer):
    from peft import PeftModel

    _, model = base_and_adapted()
    train_steps(sft_learner(model))

    path = save_checkpoint(model, tokenizer, tmp_path / "final")

    merged = AutoModelForCausalLM.from_pretrained(path)
    expected = learner_logprobs(model, PROBE)
    assert torch.allclose(learner_logprobs(merged, PROBE), expected, atol=1e-5)
    fresh, _ = load_model("tiny-random")
    adapted = PeftModel.from_pretrained(fresh, path / adapters.ADAPTER_DIR)
    assert torch.equal(learner_logprobs(adapted, PROBE), expected)


# --- stages -----------------------------------------------------------------------------


@pytest.fixture
def sft_data(tmp_path):
    rows = [(f"What is {a} + {b}?", a + b) for a in range(1, 13) for b in (2, 5)]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "completion": f"{s}"}) for p, s in rows))
    return path


def stage_config(*overrides):
    return load_config(
        None,
        [
            "model=tiny-random",
            "lora={rank: 4, alpha: 8}",
            "trainer.lr=0.02",
            "trainer.steps=4",
            "trainer.dtype=float32",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
            *overrides,
        ],
    )


def sft_config(data, *overrides):
    return stage_config(
        "stage=sft",
        f"data.path={data}",
        "trainer.micro_batch_size=4",
        "data.batch_size=4",
        "data.eval_size=4",
        *overrides,
    )


def grpo_config(*overrides):
    return stage_config(
        "env.id=palaestra-test/OddLength-v0",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.max_tokens=8",
        "engine_dtype=float32",
        *overrides,
    )


def run_stage(runner, cfg, root, resumed_step=None):
    if resumed_step is None:
        run = RunDir(root, cfg.model_dump(mode="json"))
    else:
        run = RunDir.reopen(root, cfg.model_dump(mode="json"), resumed_step)
    result = runner(cfg, run)
    run.close()
    return result


def initial_weights():
    return load_file(resolve_model("tiny-random") / "model.safetensors")


def test_a_lora_sft_stage_learns_and_its_final_checkpoint_loads_on_its_own(tmp_path, sft_data):
    result = run_stage(run_sft, sft_config(sft_data), tmp_path / "run")

    assert result.metrics["eval/loss_after"] < result.metrics["eval/loss_before"]
    final = load_file(f"{result.checkpoint}/model.safetensors")
    start = initial_weights()
    assert final.keys() == start.keys()  # the base model's names: no adapter layers
    assert torch.equal(final["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert not torch.equal(
        final["model.layers.0.self_attn.q_proj.weight"],
        start["model.layers.0.self_attn.q_proj.weight"],
    )
    AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert (tmp_path / "run/checkpoints/final/adapter/adapter_config.json").is_file()


def test_a_lora_grpo_stage_syncs_the_adapter_and_copies_no_reference(tmp_path, monkeypatch):
    copies = []
    real_copy = common.frozen_copy
    monkeypatch.setattr(common, "frozen_copy", lambda m: copies.append(m) or real_copy(m))
    cfg = grpo_config(
        "grpo.kl_coef=0.1",
        "verify_every=1",
        "verify_tolerance=1e-4",
        "eval.after=true",
        "eval.num_tasks=2",
    )

    result = run_stage(run_grpo, cfg, tmp_path / "run")

    assert len(copies) == 1  # the engine's; the reference is the policy with adapters off
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    assert len(steps) == 4 and all(r["sync/max_abs_dlogprob"] < 1e-4 for r in steps)
    assert any(r["kl_per_seq"] > 0 for r in steps[1:])  # the policy left its reference
    assert result.after is not None and result.after.num_tasks == 2  # sampled by the engine
    final = load_file(f"{result.checkpoint}/model.safetensors")
    assert final.keys() == initial_weights().keys()
    AutoModelForCausalLM.from_pretrained(result.checkpoint)


@pytest.fixture
def pref_data(tmp_path):
    rows = [(f"What is {a} + 2?", a + 2) for a in range(1, 13)]
    path = tmp_path / "prefs.jsonl"
    pairs = [{"prompt": p, "chosen": f"{s}", "rejected": f"{s + 1}"} for p, s in rows]
    path.write_text("\n".join(json.dumps(r) for r in pairs))
    return path


@pytest.mark.parametrize("stage", ["dpo", "ppo", "online_dpo"])
def test_every_other_policy_stage_trains_its_adapters(tmp_path, pref_data, stage, monkeypatch):
    from palaestra.trainer.stages.dpo import run_dpo
    from palaestra.trainer.stages.online_dpo import run_online_dpo
    from palaestra.trainer.stages.ppo import run_ppo

    copies = []
    real_copy = common.frozen_copy
    monkeypatch.setattr(common, "frozen_copy", lambda m: copies.append(m) or real_copy(m))
    if stage == "dpo":
        runner, cfg = run_dpo, sft_config(pref_data, "stage=dpo")
    elif stage == "ppo":
        runner, cfg = run_ppo, grpo_config("stage=ppo", "grpo.kl_coef=0.1")
    else:
        runner, cfg = run_online_dpo, grpo_config("stage=online_dpo", "rollout.group_size=4")

    result = run_stage(runner, cfg, tmp_path / "run")

    assert len(copies) == (0 if stage == "dpo" else 1)  # an engine's copy, no reference's
    final, start = load_file(f"{result.checkpoint}/model.safetensors"), initial_weights()
    assert final.keys() == start.keys()
    assert torch.equal(final["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(final[q], start[q])


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_lora_stage_resumed_from_its_state_ends_bit_identical(tmp_path, sft_data, stage):
    runner, cfg = (run_sft, sft_config(sft_data)) if stage == "sft" else (run_grpo, grpo_config())
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"save_every": 2})})
    root = tmp_path / "run"
    uninterrupted = load_file(f"{run_stage(runner, cfg, root).checkpoint}/model.safetensors")
    start = initial_weights()
    assert any(not torch.equal(uninterrupted[k], start[k]) for k in start)  # it trained
    state = latest_state(root / "checkpoints")
    assert (state / adapters.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert not (state / "model.safetensors").exists()  # the base is not saved again

    result = run_stage(runner, cfg, root, resumed_step=state_step(state))

    resumed = load_file(f"{result.checkpoint}/model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
