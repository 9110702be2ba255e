"""Online DPO: pairs from the model's own rollouts, scored on sampled tokens only."""

from __future__ import annotations

import json
import math

import torch

from palaestra.agent.trajectory import StopReason, Trajectory, Turn
from palaestra.config import load_config
from palaestra.rundir import RunDir
from palaestra.trainer.stages.online_dpo import _episode_sums, preference_pairs, run_online_dpo


def episode(group: int, reward: float, name: str, mask=(0, 0, 1, 1, 0, 1)) -> Trajectory:
    n = len(mask)
    return Trajectory(
        token_ids=tuple(range(n)),
        loss_mask=tuple(mask),
        logprobs=(0.0,) * n,
        turns=(Turn(2, 4, "a", "stop"), Turn(5, 6, "b", "stop", reward)),
        reward=reward,
        reward_components={},
        stop_reason=StopReason.ANSWERED,
        policy_version=0,
        group_id=group,
        env_id="test",
        task_id=name,
    )


def test_pairs_are_best_with_worst_inwards_within_each_group():
    group0 = [episode(0, r, f"g0-{r}") for r in (0.0, 1.0, 0.5, 0.2)]
    group1 = [episode(1, 1.0, "a"), episode(1, 1.0, "b")]  # all equal: no pair
    pairs, without = preference_pairs(group0 + group1, per_group=2)
    assert [(c.reward, r.reward) for c, r in pairs] == [(1.0, 0.0), (0.5, 0.2)]
    assert without == 1
    pairs, _ = preference_pairs(group0, per_group=1)
    assert [(c.reward, r.reward) for c, r in pairs] == [(1.0, 0.0)]
    # a middle pair with equal rewards is not a preference
    tied = [episode(2, r, str(r)) for r in (1.0, 0.3, 0.3, 0.0)]
    pairs, _ = preference_pairs(tied, per_group=2)
    assert [(c.reward, r.reward) for c, r in pairs] == [(1.0, 0.0)]


def test_episode_log_probs_sum_sampled_tokens_across_turns_and_split_samples():
    from palaestra.trainer.batch import collate

    whole = episode(0, 1.0, "whole", mask=(0, 1, 1, 0, 0, 1))  # a tool reply at 3-4
    split = Trajectory(**{**whole.__dict__, "task_id": "split", "segment_starts": (0, 3)})
    batch = collate([whole, split], pad_id=0)
    logprobs_BT = torch.arange(1.0, 1.0 + batch.input_ids_BT.numel()).view(batch.input_ids_BT.shape)
    sums_E, lengths_E = _episode_sums(batch, -logprobs_BT)
    # row 0 = whole: sampled at 1, 2, 5 -> values 2, 3, 6 (row width 6)
    width = batch.input_ids_BT.shape[1]
    assert sums_E[0].item() == -(2 + 3 + 6) and lengths_E[0].item() == 3
    # the split episode's rows: [0, 1, 2] (sampled 1, 2) and [3, 4, 5] (sampled at its 2)
    expected = (width + 2) + (width + 3) + (2 * width + 3)
    assert sums_E[1].item() == -expected and lengths_E[1].item() == 3


def test_online_dpo_trains_on_pairs_from_its_own_rollouts(tmp_path):
    cfg = load_config(
        None,
        [
            "model=tiny-random",
            "stage=online_dpo",
            "env.id=palaestra-test/OddLength-v0",
            "rollout.tasks_per_step=2",
            "rollout.group_size=4",
            "rollout.max_tokens=6",
            "dpo.pairs_per_group=2",
            "trainer.steps=2",
            "trainer.lr=1e-3",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "run", cfg.model_dump(mode="json"))
    result = run_online_dpo(cfg, run)
    run.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert len(records) == 2 and result.stage == "online_dpo"
    for r in records:
        assert r["online_dpo/pairs"] + r["online_dpo/groups_without_pair"] >= 2
        if r["online_dpo/pairs"]:
            assert math.isfinite(r["loss"]) and "rewards/margin" in r
        else:
            assert r["online_dpo/skipped_update"] == 1.0
    assert any(r["online_dpo/pairs"] > 0 for r in records)
