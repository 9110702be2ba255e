"""Numerical guards: a NaN or inf loss or gradient skips the step and changes nothing; too
many in a row stop the stage with the likely causes and finite weights kept; a non-finite
reward is an env failure, never data; a checkpoint never holds NaN."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from palaestra.config import load_config
from palaestra.envs import register
from palaestra.envs.core import TextEnv
from palaestra.models import load_model
from palaestra.rundir import RunDir
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.checkpoint import save_checkpoint
from palaestra.trainer.errors import NonFiniteStepsError, NonFiniteWeightsError
from palaestra.trainer.learner import Learner, OptimSettings, policy_forward
from palaestra.trainer.stages.grpo import run_grpo
from palaestra.trainer.stages.sft import run_sft


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny-random")
    return model


BATCH = TokenBatch(
    input_ids_BT=torch.tensor([[5, 6, 7, 10, 11, 12], [5, 6, 20, 21, 2, 2]]),
    attention_mask_BT=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    loss_mask_BT=torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]]),
)
"""Two rows, their sampled tokens under the loss mask."""


def nll(batch, logprobs_BT, *, num_tokens, num_seqs):
    loss = -(logprobs_BT * batch.loss_mask_BT).sum() / num_tokens
    return loss, {"loss": float(loss.detach())}


def nan_loss(batch, logprobs_BT, *, num_tokens, num_seqs):
    loss, _ = nll(batch, logprobs_BT, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss * float("nan"), {"loss": float("nan")}


def inf_gradient(batch, logprobs_BT, *, num_tokens, num_seqs):
    """Value 0 (finite), gradient inf: d sqrt(x)/dx at 0."""
    loss = torch.sqrt(logprobs_BT - logprobs_BT.detach()).sum()
    return loss, {"loss": float(loss.detach())}


def state(learner: Learner):
    return (
        copy.deepcopy(learner.model.state_dict()),
        copy.deepcopy(learner.optimizer.state_dict()),
        copy.deepcopy(learner.scheduler.state_dict()),
        learner.steps,
    )


def assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tensors(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("loss_fn", [nan_loss, inf_gradient], ids=["nan-loss", "inf-gradient"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(tiny, loss_fn):
    learner = Learner(
        copy.deepcopy(tiny),
        OptimSettings(lr=1e-2, warmup_steps=3, micro_batch_size=1),
        forward=policy_forward(1.0),
    )
    first = learner.step(BATCH, nll)  # optimizer state (moments) exists from here on
    before = state(learner)

    skipped = learner.step(BATCH, loss_fn)

    assert first["nonfinite_step"] == 0.0 and skipped["nonfinite_step"] == 1.0
    assert not (math.isfinite(skipped["loss"]) and math.isfinite(skipped["grad_norm"]))
    assert skipped["lr"] == first["lr"]  # the warm-up did not advance
    assert_same_tensors(state(learner), before)  # weights, AdamW moments, schedule, count
    assert all(p.grad is None for p in learner.model.parameters())
    after = learner.step(BATCH, nll)  # and the next finite step trains as usual
    assert after["nonfinite_step"] == 0.0 and learner.steps == 2 and after["lr"] > first["lr"]
    assert not torch.equal(learner.model.lm_head.weight, before[0]["lm_head.weight"])


def test_a_checkpoint_of_non_finite_weights_is_refused_and_nothing_is_written(tiny, tmp_path):
    from palaestra.models import load_tokenizer

    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.norm\.weight"):
        save_checkpoint(broken, load_tokenizer("tiny-random"), tmp_path / "final")
    assert list(tmp_path.iterdir()) == []


# --- through the stages --------------------------------------------------------------------


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def inject_nan(monkeypatch, bad_steps: set[int]) -> list[dict[str, torch.Tensor]]:
    """Make the loss NaN on the learner steps numbered in ``bad_steps`` (from 1); returns
    the list that collects the weights after each learner step."""
    real_step, calls = Learner.step, itertools.count(1)
    weights_after: list[dict[str, torch.Tensor]] = []

    def step(self, batch, loss_fn, **kwargs):
        if next(calls) in bad_steps:
            loss_fn = made_nan(loss_fn)
        metrics = real_step(self, batch, loss_fn, **kwargs)
        weights_after.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return metrics

    monkeypatch.setattr(Learner, "step", step)
    return weights_after


def made_nan(loss_fn):
    def nan(batch, outputs, *, num_tokens, num_seqs):
        loss, metrics = loss_fn(batch, outputs, num_tokens=num_tokens, num_seqs=num_seqs)
        return loss * float("nan"), metrics | {"loss": float("nan")}

    return nan


def sft_data(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {a} + 2?", "completion": f"\\boxed{{{a + 2}}}"} for a in range(12)]
    path.write_text("\n".join(map(json.dumps, rows)))
    return path


def test_sft_stops_after_k_non_finite_steps_in_a_row_keeping_the_last_good_weights(
    tmp_path, monkeypatch, capsys
):
    weights_after = inject_nan(monkeypatch, {2, 3, 4, 5, 6})
    cfg = load_config(
        None,
        [
            "model=tiny-random",
            "stage=sft",
            f"data.path={sft_data(tmp_path)}",
            "data.batch_size=4",
            "data.eval_size=0",
            "trainer.micro_batch_size=4",
            "trainer.steps=6",
            "trainer.lr=0.01",
            "trainer.max_nonfinite_steps=3",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "run", cfg.model_dump(mode="json"))

    with pytest.raises(NonFiniteStepsError, match=r"3 steps in a row .*trainer\.lr = 0\.01"):
        run_sft(cfg, run)
    run.close()

    logged = records(run.root)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["nonfinite_step"] for r in logged] == [0, 1, 1, 1]
    assert [r["train/nonfinite_steps"] for r in logged] == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "step 2: skipped, the loss or gradient norm is not finite" in err
    kept = load_file(run.checkpoints / "interrupted" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert all(torch.equal(kept[name], weights_after[0][name]) for name in kept)  # step 1's
    assert all(torch.equal(weights_after[3][n], weights_after[0][n]) for n in weights_after[0])


GRPO = [
    "model=tiny-random",
    "env.id=palaestra-test/OddLength-v0",
    "rollout.tasks_per_step=2",
    "rollout.group_size=2",
    "rollout.max_tokens=6",
    "trainer.lr=1e-3",
    "eval.before=false",
    "eval.after=false",
    "run.progress=false",
    "engine_dtype=float32",
]


def run_grpo_with(tmp_path, *overrides):
    cfg = load_config(None, [*GRPO, *overrides])
    run = RunDir(tmp_path / "run", cfg.model_dump(mode="json"))
    try:
        return run_grpo(cfg, run), run
    finally:
        run.close()


def test_grpo_skips_a_non_finite_step_syncs_its_version_and_trains_on(tmp_path, monkeypatch):
    weights_after = inject_nan(monkeypatch, {2})

    result, run = run_grpo_with(tmp_path, "trainer.steps=3", "verify_every=1")

    logged = records(run.root)
    assert [r["nonfinite_step"] for r in logged] == [0, 1, 0]
    assert [r["train/nonfinite_steps"] for r in logged] == [0, 1, 1]
    assert all(torch.equal(weights_after[1][n], weights_after[0][n]) for n in weights_after[0])
    assert not torch.equal(weights_after[2]["lm_head.weight"], weights_after[1]["lm_head.weight"])
    # the engine was checked against the (unchanged) weights after the skipped step too
    assert all(r["sync/max_abs_dlogprob"] < 1e-3 for r in logged)
    final = load_file(f"{result.checkpoint}/model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_grpo_stops_after_k_non_finite_steps_in_a_row(tmp_path, monkeypatch, capsys):
    weights_after = inject_nan(monkeypatch, {2, 3, 4, 5})

    with pytest.raises(NonFiniteStepsError, match="2 steps in a row"):
        run_grpo_with(tmp_path, "trainer.steps=5", "trainer.max_nonfinite_steps=2")

    assert [r["nonfinite_step"] for r in records(tmp_path / "run")] == [0, 1, 1]
    kept = load_file(tmp_path / "run" / "checkpoints" / "interrupted" / "model.safetensors")
    assert all(torch.equal(kept[n], weights_after[0][n]) for n in kept)  # step 1's weights
    assert "step 3: skipped" in capsys.readouterr().err


_episodes = itertools.count()


class NaNRewardEnv(TextEnv):
    """One turn; every other episode's reward is NaN (a broken reward function)."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Say anything."}], {"task_id": f"t{seed}"}

    def step(self, action):
        reward = float("nan") if next(_episodes) % 2 else float(len(action) % 2)
        return [], reward, True, False, {}


register("palaestra-test/NaNReward-v0", lambda **kwargs: NaNRewardEnv())


def test_a_nan_reward_is_an_env_failure_never_training_data(tmp_path):
    _, run = run_grpo_with(tmp_path, "trainer.steps=2", "env.id=palaestra-test/NaNReward-v0")

    logged = records(run.root)
    assert all(r["stop/env_error"] == r["infra_failures"] == 2 for r in logged)
    assert all(math.isfinite(r["reward_mean"]) and r["nonfinite_step"] == 0 for r in logged)
    episodes = [json.loads(line) for line in (run.root / "trajectories.jsonl").open()]
    assert all(math.isfinite(e["reward"]) for e in episodes)


def test_after_a_failure_non_finite_weights_are_not_saved_and_the_reason_is_printed(
    tiny, tmp_path, capsys
):
    from palaestra.models import load_tokenizer
    from palaestra.trainer.stages.common import save_interrupted

    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("inf")
    run = RunDir(tmp_path / "run", {})

    save_interrupted(broken, load_tokenizer("tiny-random"), run, step=5)
    run.close()

    assert not (run.checkpoints / "interrupted").exists()
    assert "weights not saved" in capsys.readouterr().err
