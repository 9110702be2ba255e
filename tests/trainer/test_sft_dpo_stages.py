"""The SFT and DPO-family stages on the tiny model: they learn, log, cache and checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from palaestra.config import load_config
from palaestra.rundir import RunDir
from palaestra.trainer.stages.dpo import run_dpo
from palaestra.trainer.stages.sft import run_sft


def sums(n: int) -> list[tuple[str, str, str]]:
    """(prompt, right answer, wrong answer) for small sums."""
    return [
        (f"What is {a} + {b}?", f"\\boxed{{{a + b}}}", f"\\boxed{{{a + b + 1}}}")
        for a in range(1, 1 + n)
        for b in (2, 5)
    ]


@pytest.fixture
def data(tmp_path):
    rows = sums(12)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c, _ in rows))
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) for p, c, r in rows)
    )
    return {"sft": sft, "prefs": prefs}


def config(tmp_path, *overrides):
    return load_config(
        None,
        [
            "model=tiny-random",
            "trainer.lr=0.01",
            "trainer.steps=6",
            "trainer.micro_batch_size=3",
            "data.batch_size=4",
            "data.eval_size=6",
            "eval.before=false",
            "eval.after=false",
            "run.progress=false",
            *overrides,
        ],
    )


def records(run, kind="train"):
    lines = (run.root / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_sft_lowers_the_held_out_loss_and_writes_a_loadable_checkpoint(tmp_path, data):
    cfg = config(tmp_path, "stage=sft", f"data.path={data['sft']}")
    run = RunDir(tmp_path / "sft", cfg.model_dump(mode="json"))
    result = run_sft(cfg, run)
    run.close()
    assert result.metrics["eval/loss_after"] < result.metrics["eval/loss_before"] - 0.5
    assert [r["step"] for r in records(run)] == list(range(1, 7))
    assert all(r["tokens"] > 0 and "loss" in r for r in records(run))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.checkpoint)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "kto", "simpo", "orpo"])
def test_every_preference_loss_raises_the_held_out_preference(tmp_path, data, loss):
    cfg = config(
        tmp_path, "stage=dpo", f"data.path={data['prefs']}", f"dpo.loss={loss}", "dpo.beta=0.5"
    )
    run = RunDir(tmp_path / loss, cfg.model_dump(mode="json"))
    result = run_dpo(cfg, run)
    run.close()
    m = result.metrics
    # held out: the model now finds the right sums more likely than the wrong ones
    assert m["eval/margin_after"] > m["eval/margin_before"]
    assert 0 <= m["eval/pref_accuracy_after"] <= 1
    if loss not in ("simpo", "orpo"):  # the implicit reward ranks held-out pairs right
        assert m["eval/reward_accuracy_after"] > m["eval/reward_accuracy_before"] == 0
    cached = run.root / "reference_logprobs.pt"
    assert cached.exists() == (loss not in ("simpo", "orpo"))  # reference-free: no reference
    assert all("loss" in r for r in records(run))


def test_reference_logprobs_are_computed_once_before_training(tmp_path, data, monkeypatch):
    from palaestra.trainer.learner import Learner

    scored = []
    score = Learner.score

    def counting(self, batch, *, model=None, forward=None):
        scored.append((model is None or model is self.model, len(batch)))
        return score(self, batch, model=model, forward=forward)

    monkeypatch.setattr(Learner, "score", counting)
    cfg = config(tmp_path, "stage=dpo", f"data.path={data['prefs']}")
    run = RunDir(tmp_path / "once", cfg.model_dump(mode="json"))
    run_dpo(cfg, run)
    run.close()
    by_reference = sum(n for own, n in scored if not own)
    assert by_reference == 2 * 24  # every answer of the 24 pairs (train and held out), once
    cache = torch.load(run.root / "reference_logprobs.pt")
    assert len(cache["train"]) + len(cache["held_out"]) == 48


def test_unpaired_data_is_refused_by_pairwise_losses(tmp_path):
    from palaestra.trainer.errors import DataError

    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n")
    cfg = config(tmp_path, "stage=dpo", f"data.path={path}", "data.eval_size=0")
    run = RunDir(tmp_path / "refused", cfg.model_dump(mode="json"))
    with pytest.raises(DataError, match="only the KTO loss"):
        run_dpo(cfg, run)
    run.close()
