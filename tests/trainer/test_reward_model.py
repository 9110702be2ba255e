"""Reward models: Bradley-Terry training, then the model as a learned reward in an env."""

from __future__ import annotations

import json

import pytest

from palaestra import envs
from palaestra.agent.learned_reward import LearnedReward, RewardModelScorer
from palaestra.config import load_config
from palaestra.rundir import RunDir
from palaestra.trainer.stages.reward_model import run_reward_model


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A reward model trained on the tiny model to prefer answers that say 'correct'."""
    tmp = tmp_path_factory.mktemp("rm")
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"correct {i}", "rejected": f"wrong {i}"}
        for i in range(40)
    ]
    data = tmp / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(
        None,
        [
            "model=tiny-random",
            "stage=reward_model",
            f"data.path={data}",
            "data.eval_size=8",
            "data.batch_size=8",
            "trainer.steps=20",
            "trainer.lr=0.01",
            "trainer.micro_batch_size=4",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp / "run", cfg.model_dump(mode="json"))
    result = run_reward_model(cfg, run)
    run.close()
    return result


def test_bradley_terry_training_learns_the_held_out_preference(reward_model):
    m = reward_model.metrics
    assert m["eval/rm_accuracy_after"] == 1.0
    assert m["eval/rm_margin_after"] > m["eval/rm_margin_before"] + 0.5


def test_the_reward_model_warms_up_and_checkpoints_gradients_as_configured(tmp_path, monkeypatch):
    """It trains on the one learner: ``trainer.warmup_steps`` ramps the learning rate
    (step k runs at ``lr * k / (warmup_steps + 1)``, then ``lr``) and
    ``trainer.gradient_checkpointing`` is on; its own loop used to ignore both."""
    from palaestra.trainer.learner import Learner

    seen = []
    step = Learner.step

    def recording(self, batch, loss_fn, **kwargs):
        seen.append((self.optimizer.param_groups[0]["lr"], self.model.is_gradient_checkpointing))
        return step(self, batch, loss_fn, **kwargs)

    monkeypatch.setattr(Learner, "step", recording)
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": f"Q{i}?", "chosen": f"correct {i}", "rejected": f"wrong {i}"})
            for i in range(6)
        )
    )
    cfg = load_config(
        None,
        [
            "model=tiny-random",
            "stage=reward_model",
            f"data.path={data}",
            "data.batch_size=2",
            "trainer.steps=4",
            "trainer.lr=0.03",
            "trainer.warmup_steps=2",
            "trainer.gradient_checkpointing=true",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "run", cfg.model_dump(mode="json"))
    run_reward_model(cfg, run)
    run.close()
    assert [lr for lr, _ in seen] == pytest.approx([0.01, 0.02, 0.03, 0.03])
    assert all(checkpointing for _, checkpointing in seen)
    records = [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss", "accuracy", "margin"} <= set(r) for r in records if r["kind"] == "train")


def test_the_checkpoint_scores_conversations(reward_model):
    scorer = RewardModelScorer(reward_model.checkpoint)
    good, bad = scorer.score(
        [
            [
                {"role": "user", "content": "Question 99?"},
                {"role": "assistant", "content": "correct 99"},
            ],
            [
                {"role": "user", "content": "Question 99?"},
                {"role": "assistant", "content": "wrong 99"},
            ],
        ]
    )
    assert good > bad


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_learned_reward_scores_a_real_env_episode(reward_model, mode):
    scorer = RewardModelScorer(reward_model.checkpoint)
    env = LearnedReward(
        envs.make("palaestra/Math-v0", source="reasoning_gym:chain_sum", split="train"),
        scorer,
        mode=mode,
        weight=2.0,
    )
    observation, _ = env.reset(seed=3)
    action = "correct \\boxed{7}"
    _, reward, terminated, _, info = env.step(action)
    assert terminated
    conversation = [*observation, {"role": "assistant", "content": action}]
    learned = 2.0 * scorer.score([conversation])[0]
    components = info["reward_components"]
    assert components["learned"] == pytest.approx(learned, abs=1e-5)
    env_reward = sum(v for k, v in components.items() if k != "learned")
    expected = learned if mode == "replace" else env_reward + learned
    assert reward == pytest.approx(expected, abs=1e-5)
    env.close()


def test_a_failing_scorer_raises_instead_of_scoring_zero():
    class Broken:
        def score(self, conversations):
            raise RuntimeError("reward server down")

    env = LearnedReward(envs.make("palaestra/Math-v0", split="train"), Broken())
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match="reward server down"):
        env.step("\\boxed{1}")
    env.close()


@pytest.mark.slow
def test_grpo_trains_on_the_learned_reward(reward_model, tmp_path):
    from palaestra.trainer.stages.grpo import run_grpo

    cfg = load_config(
        None,
        [
            "model=tiny-random",
            "env.kwargs.source=reasoning_gym:chain_sum",
            f"env.reward_model.path={reward_model.checkpoint}",
            "rollout.tasks_per_step=2",
            "rollout.group_size=2",
            "rollout.max_tokens=8",
            "trainer.steps=2",
            "eval.before=false",
            "eval.num_tasks=4",
            "run.progress=false",
        ],
    )
    run = RunDir(tmp_path / "grpo", cfg.model_dump(mode="json"))
    result = run_grpo(cfg, run)
    run.close()
    train = [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in train if r["kind"] == "train"]
    assert len(steps) == 2 and all("reward/learned" in r for r in steps)
    # held-out evaluation keeps the env's own reward: no learned component there
    episodes = [
        json.loads(line) for line in (run.root / "trajectories.jsonl").read_text().splitlines()
    ]
    assert all("learned" not in e["reward_components"] for e in episodes if e["kind"] == "eval")
    assert result.after is not None
