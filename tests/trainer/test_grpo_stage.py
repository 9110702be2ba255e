"""The GRPO stage loop in process: infrastructure failures never become training data, and
weight syncs are verified when asked."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil

import pytest

from palaestra.config import load_config
from palaestra.envs import register
from palaestra.envs.core import TextEnv
from palaestra.rundir import RunDir
from palaestra.trainer.errors import AllEpisodesFailedError
from palaestra.trainer.stages.grpo import run_grpo

EPISODES_PER_STEP = 4
_steps_taken = itertools.count()


class FlakyToolEnv(TextEnv):
    """Answers correctly-formatted replies for one training step, then its backend dies."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Say anything."}], {"task_id": f"t{seed}"}

    def step(self, action):
        if next(_steps_taken) >= EPISODES_PER_STEP:
            raise ConnectionError("tool backend unreachable")
        reward = float(len(action) % 2)
        return [], reward, True, False, {"reward_components": {"parity": reward}}


register("palaestra-test/Flaky-v0", lambda **kwargs: FlakyToolEnv())


def test_a_dead_env_stops_training_with_a_named_error_and_keeps_the_weights(tmp_path):
    config = load_config(
        None,
        [
            "model=tiny-random",
            "env.id=palaestra-test/Flaky-v0",
            "rollout.tasks_per_step=2",
            "rollout.group_size=2",
            "rollout.max_tokens=4",
            "trainer.steps=3",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "run", config.model_dump(mode="json"))
    with pytest.raises(AllEpisodesFailedError, match="tool backend unreachable"):
        run_grpo(config, run)
    run.close()
    steps = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1  # step 1 trained; step 2 had nothing to train on
    assert (tmp_path / "run" / "checkpoints" / "interrupted" / "model.safetensors").exists()


class ParityEnv(TextEnv):
    """One turn; reward 1 for a reply of odd length."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Say anything."}], {"task_id": f"t{seed}"}

    def step(self, action):
        reward = float(len(action) % 2)
        return [], reward, True, False, {"reward_components": {"parity": reward}}


register("palaestra-test/Parity-v0", lambda **kwargs: ParityEnv())

TWO_STEPS = [
    "env.id=palaestra-test/Parity-v0",
    "rollout.tasks_per_step=2",
    "rollout.group_size=2",
    "rollout.max_tokens=6",
    "trainer.steps=2",
    "trainer.lr=1e-3",
    "eval.before=false",
    "eval.after=false",
    "run.progress=false",
    "engine_dtype=float32",
    "verify_every=1",
]


def train_records(tmp_path, overrides):
    config = load_config(None, overrides)
    run = RunDir(tmp_path / "run", config.model_dump(mode="json"))
    run_grpo(config, run)
    run.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_verify_every_checks_the_engine_after_each_sync_and_logs_the_gap(tmp_path):
    records = train_records(tmp_path, ["model=tiny-random", *TWO_STEPS])

    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync/max_abs_dlogprob"] < 1e-3 for r in records)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_grpo_on_the_vllm_engine_syncs_verified_weights(tmp_path, vllm_tiny_model_dir):
    records = train_records(tmp_path, [f"model={vllm_tiny_model_dir}", "engine=vllm", *TWO_STEPS])

    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync/max_abs_dlogprob"] < 1e-3 for r in records)
    assert all(r["time/sync_s"] > 0 for r in records)


def test_a_synchronous_run_is_reproducible_from_its_seed(tmp_path):
    first = train_records(tmp_path / "a", ["model=tiny-random", *TWO_STEPS])
    second = train_records(tmp_path / "b", ["model=tiny-random", *TWO_STEPS])

    for a, b in zip(first, second, strict=True):
        assert (a["reward_mean"], a["tokens_mean"], a["loss"]) == (
            b["reward_mean"],
            b["tokens_mean"],
            b["loss"],
        )


THREE_ASYNC_STEPS = [*TWO_STEPS, "trainer.steps=3", "rollout.max_staleness=1"]


def assert_within_staleness_bound(records, bound: int, groups_per_step: int) -> None:
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0 <= r["staleness/mean"] <= r["staleness/max"] <= bound
        histogram = [r[f"staleness/groups_{k}"] for k in range(bound + 1)]
        assert sum(histogram) == groups_per_step  # every trained group is counted once
        assert r["sync/max_abs_dlogprob"] < 1e-3  # weights verified after every sync


def test_async_grpo_steps_stay_within_the_staleness_bound(tmp_path):
    records = train_records(tmp_path, ["model=tiny-random", *THREE_ASYNC_STEPS])

    assert_within_staleness_bound(records, bound=1, groups_per_step=2)
    assert records[0]["staleness/max"] == 0  # step 1 can only be sampled on the initial weights


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_async_grpo_on_the_vllm_engine_stays_within_the_staleness_bound(
    tmp_path, vllm_tiny_model_dir
):
    records = train_records(
        tmp_path, [f"model={vllm_tiny_model_dir}", "engine=vllm", *THREE_ASYNC_STEPS]
    )

    assert_within_staleness_bound(records, bound=1, groups_per_step=2)


class TwoTurnEnv(TextEnv):
    """Two assistant turns: a reply, a follow-up question, a second reply scored by parity."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return [{"role": "user", "content": "Say anything."}], {"task_id": f"t{seed}"}

    def step(self, action):
        self.turn += 1
        if self.turn == 1:
            return [{"role": "user", "content": "And again?"}], 0.0, False, False, {}
        return [], float(len(action) % 2), True, False, {}


register("palaestra-test/TwoTurn-v0", lambda **kwargs: TwoTurnEnv())

HISTORY_REWRITING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}(an earlier reply)"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Replaces every earlier assistant reply: no second turn extends the first's tokens."""


def test_episodes_a_template_splits_train_as_separate_samples_of_one_episode(tmp_path):
    from palaestra.models import resolve_model

    model_dir = tmp_path / "rewriting"
    shutil.copytree(resolve_model("tiny-random"), model_dir)
    (model_dir / "chat_template.jinja").write_text(HISTORY_REWRITING)
    overrides = [o for o in TWO_STEPS if not o.startswith("env.id")]

    records = train_records(
        tmp_path,
        [
            f"model={model_dir}",
            "env.id=palaestra-test/TwoTurn-v0",
            "rollout.max_turns=2",
            *overrides,
        ],
    )

    assert [r["step"] for r in records] == [1, 2]
    assert all(r["episodes_split"] == EPISODES_PER_STEP for r in records)
    # both turns played (the random model rarely ends a turn itself: max_tokens)
    assert all(r["stop/answered"] + r["stop/max_tokens"] == EPISODES_PER_STEP for r in records)
    assert all(math.isfinite(r["loss"]) and r["sync/max_abs_dlogprob"] < 1e-3 for r in records)


def test_turns_credited_by_return_to_go_train_on_a_two_turn_env(tmp_path):
    overrides = [o for o in TWO_STEPS if not o.startswith("env.id")]
    records = train_records(
        tmp_path,
        [
            "model=tiny-random",
            "env.id=palaestra-test/TwoTurn-v0",
            "rollout.max_turns=2",
            "grpo.turn_credit=return_to_go",
            *overrides,
        ],
    )

    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["sync/max_abs_dlogprob"] < 1e-3 for r in records)


@pytest.mark.parametrize(
    "algorithm",
    [
        ["grpo.advantage=rloo"],
        ["grpo.advantage=reinforce_pp"],
        ["grpo.ratio_level=sequence", "grpo.aggregation=seq-mean-token-mean"],  # GSPO
        ["grpo.dynamic_sampling=true", "grpo.dynamic_sampling_rounds=2"],  # DAPO
        ["grpo.overlong_buffer=3", "grpo.overlong_filter=true"],  # DAPO's length handling
    ],
)
def test_the_policy_gradient_variants_train_through_the_stage(tmp_path, algorithm):
    records = train_records(tmp_path, ["model=tiny-random", *TWO_STEPS, *algorithm])

    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["sync/max_abs_dlogprob"] < 1e-3 for r in records)
    if "grpo.dynamic_sampling=true" in algorithm:  # uniform groups were counted, never lost
        last = records[-1]
        rejected = last["dynamic_sampling/groups_rejected_total"]
        assert rejected >= last["dynamic_sampling/rejected_groups_used_total"]
        assert all(r["staleness/groups_0"] == 2 for r in records)  # every step got its groups
    if "grpo.overlong_buffer=3" in algorithm:  # the random model's 6-token answers run long
        assert all(r["reward/overlong_penalty"] < 0 for r in records)


def test_importance_sampling_logs_a_near_zero_mismatch_when_engine_and_learner_agree(tmp_path):
    """fp32 engine and fp32 learner on the same weights: proximal == behaviour, ESS == 1."""
    config = load_config(
        None,
        [
            "model=tiny-random",
            "env.kwargs.source=reasoning_gym:chain_sum",
            "engine_dtype=float32",
            "trainer.dtype=float32",
            "grpo.importance_sampling=token",
            "rollout.tasks_per_step=2",
            "rollout.group_size=2",
            "rollout.max_tokens=6",
            "trainer.steps=2",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "run", config.model_dump(mode="json"))
    run_grpo(config, run)
    run.close()
    steps = [r for r in run.history if r["kind"] == "train"]
    assert len(steps) == 2
    for record in steps:
        assert record["mismatch/abs_dlogprob"] < 1e-4
        assert record["mismatch/ess"] == pytest.approx(1.0, abs=1e-4)
        assert record["mismatch/capped_frac"] == 0.0


def test_overlong_filtering_masks_the_loss_of_truncated_episodes_only():
    from palaestra.agent.trajectory import StopReason, Trajectory
    from palaestra.trainer.batch import collate
    from palaestra.trainer.stages.grpo import _without_truncated

    def episode(stop):
        return Trajectory(
            (1, 2, 3), (0, 1, 1), (0.0, -0.1, -0.2), (), 0.0, {}, stop, 0, 0, "e", "t"
        )

    cut, done = episode(StopReason.MAX_TOKENS), episode(StopReason.ANSWERED)
    batch = collate([cut, done], pad_id=0, advantages=[1.0, -1.0])

    assert _without_truncated(batch, [cut, done]).loss_mask_BT.tolist() == [[0, 0, 0], [0, 1, 1]]
    everything_cut = collate([cut, cut], pad_id=0, advantages=[1.0, -1.0])
    assert _without_truncated(everything_cut, [cut, cut]) is everything_cut  # nothing left else


def test_a_time_budget_stops_training_early_and_still_saves(tmp_path):
    config = load_config(None, [*TWO_STEPS, "trainer.steps=50", "trainer.max_time_s=0.001"])
    run = RunDir(tmp_path / "run", config.model_dump(mode="json"))
    result = run_grpo(config, run)
    run.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"train"' in line] == [1]
    assert (tmp_path / "run" / "checkpoints" / "final" / "model.safetensors").exists()
    assert result.checkpoint.endswith("final")
