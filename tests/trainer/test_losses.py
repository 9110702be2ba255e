"""Policy loss and KL terms: hand-computed values, micro-batch equivalence, and TRL 1.16.

The hand-worked batch used throughout (B = 2 sequences, T = 3 positions)::

    advantage     A = [+1, -1]
    mask          [[1, 1, 0],          row 0 is padded at t = 2
                   [1, 1, 1]]
    old probs     [[0.4, 0.6, 0.5],
                   [0.6, 0.2, 0.5]]
    new probs     [[0.6, 0.3, 0.5],
                   [0.3, 0.3, 0.55]]
    ratio         [[1.5, 0.5, -  ],
                   [0.5, 1.5, 1.1]]

With clip range [0.8, 1.2], per token ``l = -min(ratio * A, clip(ratio) * A)``::

    row 0, A = +1: t0 ratio 1.5 > 1.2  -> clipped high:  -min(1.5, 1.2)   = -1.2
                   t1 ratio 0.5 < 0.8  -> not clipped:   -min(0.5, 0.8)   = -0.5
    row 1, A = -1: t0 ratio 0.5 < 0.8  -> clipped low:   -min(-0.5, -0.8) =  0.8
                   t1 ratio 1.5 > 1.2  -> not clipped:   -min(-1.5, -1.2) =  1.5
                   t2 ratio 1.1 inside ->                 -min(-1.1, -1.1) =  1.1

Row sums: -1.7 and 3.4; 5 tokens in all.

The batches here keep one advantage per sequence (``advantages_B``, as TRL takes them);
``_policy_loss`` spreads it over the tokens into ``PolicyLossInputs.advantages_BT``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
from collections import defaultdict
from typing import Any

import pytest
import torch

from palaestra.options import AGGREGATIONS, KL_ESTIMATORS
from palaestra.trainer.losses import (
    PolicyLossInputs,
    PolicyLossSettings,
    kl_estimate,
    kl_penalized_rewards,
    policy_loss,
)

LN2 = math.log(2.0)


def _hand_batch() -> dict[str, torch.Tensor]:
    """The batch in the module docstring, plus reference probs at ratio 2 or 1/2 to the policy."""
    return {
        "logprobs_BT": torch.tensor([[0.6, 0.3, 0.5], [0.3, 0.3, 0.55]]).log().requires_grad_(),
        "old_logprobs_BT": torch.tensor([[0.4, 0.6, 0.5], [0.6, 0.2, 0.5]]).log(),
        "advantages_B": torch.tensor([1.0, -1.0]),
        "mask_BT": torch.tensor([[1, 1, 0], [1, 1, 1]]),
        # log(pi / pi_ref) = [[ln2, -ln2, -], [-ln2, ln2, 0]]
        "ref_logprobs_BT": torch.tensor([[0.3, 0.6, 0.5], [0.6, 0.15, 0.55]]).log(),
    }


def _without_ref(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in batch.items() if name != "ref_logprobs_BT"}


def _random_batch(seed: int, B: int = 6, T: int = 7) -> dict[str, torch.Tensor]:
    """Right-padded sequences of random lengths (one with a masked tool token), ratios wide
    enough that both clip bounds are hit."""
    generator = torch.Generator().manual_seed(seed)
    logprobs_BT = -torch.rand(B, T, generator=generator, dtype=torch.float64) * 3
    lengths_B = torch.randint(1, T + 1, (B,), generator=generator)
    lengths_B[0] = T
    mask_BT = (torch.arange(T) < lengths_B.unsqueeze(-1)).long()
    mask_BT[0, 2] = 0
    return {
        "logprobs_BT": logprobs_BT.requires_grad_(),
        "old_logprobs_BT": logprobs_BT.detach()
        + 0.4 * torch.randn(B, T, generator=generator, dtype=torch.float64),
        "advantages_B": torch.randn(B, generator=generator, dtype=torch.float64),
        "mask_BT": mask_BT,
        "ref_logprobs_BT": logprobs_BT.detach()
        + 0.3 * torch.randn(B, T, generator=generator, dtype=torch.float64),
    }


_SETTING_NAMES = {field.name for field in dataclasses.fields(PolicyLossSettings)}


def _policy_loss(
    batch: dict[str, torch.Tensor], **options: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """``policy_loss`` on a batch dict, each sequence's advantage spread over its tokens;
    ``options`` go to ``PolicyLossSettings`` or ``PolicyLossInputs`` by name."""
    values: dict[str, Any] = {**batch, **options}
    logprobs_BT = values.pop("logprobs_BT")
    advantages_B = values.pop("advantages_B")
    T = values["mask_BT"].shape[-1]
    values.setdefault("advantages_BT", advantages_B[:, None].expand(-1, T))
    settings = {name: values.pop(name) for name in _SETTING_NAMES & values.keys()}
    return policy_loss(logprobs_BT, PolicyLossInputs(**values), PolicyLossSettings(**settings))


def _rows(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """A micro-batch: the given rows of every tensor, as leaves of their own."""
    micro = {name: value.detach()[rows] for name, value in batch.items()}
    micro["logprobs_BT"].requires_grad_()
    return micro


def _grad(loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, batch["logprobs_BT"])
    return grad


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # log(pi / pi_ref) = [ln2, -ln2, 0]
    logprobs_T = torch.tensor([0.5, 0.25, 0.4]).log()
    ref_logprobs_T = torch.tensor([0.25, 0.5, 0.4]).log()
    expected = {
        "k1": [LN2, -LN2, 0.0],
        "k2": [0.5 * LN2**2, 0.5 * LN2**2, 0.0],
        # k3 = exp(-x) + x - 1:  0.5 + ln2 - 1,  2 - ln2 - 1,  0
        "k3": [LN2 - 0.5, 1 - LN2, 0.0],
    }
    for estimator, values in expected.items():
        estimate_T = kl_estimate(logprobs_T, ref_logprobs_T, estimator)
        torch.testing.assert_close(estimate_T, torch.tensor(values), msg=estimator)


def test_k1_and_k3_average_to_kl_policy_to_reference_under_the_policy():
    """Sign convention: the estimate is of KL(pi || pi_ref), with samples from pi."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    pi_ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl_pi_ref = (pi * (pi / pi_ref).log()).sum()
    for estimator in ("k1", "k3"):
        expectation = (pi * kl_estimate(pi.log(), pi_ref.log(), estimator)).sum()
        torch.testing.assert_close(expectation, kl_pi_ref, msg=estimator)


def test_k2_and_k3_are_never_negative():
    generator = torch.Generator().manual_seed(0)
    logprobs_BT, ref_logprobs_BT = -3 * torch.rand(2, 4, 16, generator=generator)
    for estimator in ("k2", "k3"):
        assert (kl_estimate(logprobs_BT, ref_logprobs_BT, estimator) >= 0).all()


def test_kl_penalized_rewards_by_hand():
    # row 0: two sampled tokens at log(pi/pi_ref) = ln2; row 1: one at -ln2, one masked.
    rewards_B = torch.tensor([1.0, 0.0])
    logprobs_BT = torch.tensor([[0.5, 0.5], [0.25, 0.9]]).log().requires_grad_()
    ref_logprobs_BT = torch.tensor([[0.25, 0.25], [0.5, 0.1]]).log()
    mask_BT = torch.tensor([[1, 1], [1, 0]])

    penalized_B, metrics = kl_penalized_rewards(
        rewards_B, logprobs_BT, ref_logprobs_BT, mask_BT, beta=0.1
    )
    # k1: sequence KLs 2 ln2 and -ln2
    torch.testing.assert_close(penalized_B, torch.tensor([1 - 0.1 * 2 * LN2, 0 + 0.1 * LN2]))
    assert metrics == pytest.approx({"kl_per_seq": (2 * LN2 - LN2) / 2})
    assert not penalized_B.requires_grad

    penalized_B, metrics = kl_penalized_rewards(
        rewards_B, logprobs_BT, ref_logprobs_BT, mask_BT, beta=0.1, estimator="k3"
    )
    # k3: sequence KLs 2 (ln2 - 0.5) and (1 - ln2)
    k3_B = torch.tensor([2 * (LN2 - 0.5), 1 - LN2])
    torch.testing.assert_close(penalized_B, rewards_B - 0.1 * k3_B)
    assert metrics["kl_per_seq"] == pytest.approx(k3_B.mean().item())


# --------------------------------------------------------------------------- policy loss by hand


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("token-mean", (-1.7 + 3.4) / 5),  # 0.34
        ("seq-mean-token-mean", (-1.7 / 2 + 3.4 / 3) / 2),  # 0.141667
        ("seq-mean-token-sum-norm", (-1.7 / 4 + 3.4 / 4) / 2),  # max_seq_len 4: 0.2125
    ],
)
def test_policy_loss_by_hand_for_each_aggregation(aggregation, expected):
    loss, metrics = _policy_loss(
        _without_ref(_hand_batch()), aggregation=aggregation, max_seq_len=4
    )
    assert loss.item() == pytest.approx(expected)
    assert metrics == pytest.approx(
        {
            "loss": expected,
            "policy_loss": expected,
            "clip_frac_low": 1 / 5,  # row 1, t0
            "clip_frac_high": 1 / 5,  # row 0, t0
            "ratio_mean": (1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5,
        }
    )


def test_gradient_flows_only_through_unclipped_sampled_tokens():
    # token-mean: dl/dlogprob = -A * ratio / 5 where not clipped; 0 where clipped or masked.
    batch = _hand_batch()
    loss, _ = _policy_loss(_without_ref(batch))
    expected_BT = torch.tensor(
        [
            [0.0, -1 * 0.5 / 5, 0.0],  # clipped high, unclipped (A > 0, ratio < 0.8), masked
            [0.0, 1 * 1.5 / 5, 1 * 1.1 / 5],  # clipped low, unclipped (A < 0, ratio > 1.2), inside
        ]
    )
    torch.testing.assert_close(_grad(loss, batch), expected_BT)


def test_wider_clip_high_lets_the_positive_advantage_token_through():
    # DAPO's clip-higher: with 1 + clip_high = 1.6 the ratio 1.5 of row 0, t0 is no longer
    # clipped, so its loss is -1.5 instead of -1.2; the negative-advantage side is unchanged.
    loss, metrics = _policy_loss(_without_ref(_hand_batch()), clip_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 3.4) / 5)
    assert metrics["clip_frac_high"] == 0.0
    assert metrics["clip_frac_low"] == pytest.approx(1 / 5)


def test_wider_clip_low_lets_the_negative_advantage_token_through():
    # With 1 - clip_low = 0.4 the ratio 0.5 of row 1, t0 is inside: loss 0.5 instead of 0.8.
    loss, metrics = _policy_loss(_without_ref(_hand_batch()), clip_low=0.6)
    assert loss.item() == pytest.approx((-1.7 + 0.5 + 1.5 + 1.1) / 5)
    assert metrics["clip_frac_low"] == 0.0


@pytest.mark.parametrize(
    ("estimator", "kl_sum", "dkl_dlogprob_BT"),
    [
        # log(pi/pi_ref) = [[ln2, -ln2, -], [-ln2, ln2, 0]]
        ("k1", 0.0, [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
        ("k2", 4 * 0.5 * LN2**2, [[LN2, -LN2, 0.0], [-LN2, LN2, 0.0]]),
        # k3 sums to 2 (ln2 - 0.5) + 2 (1 - ln2) = 1; dk3/dlogprob = 1 - pi_ref / pi
        ("k3", 1.0, [[0.5, -1.0, 0.0], [-1.0, 0.5, 0.0]]),
    ],
)
def test_kl_in_the_loss_by_hand(estimator, kl_sum, dkl_dlogprob_BT):
    batch = _hand_batch()
    loss, metrics = _policy_loss(batch, kl_coef=0.1, kl_estimator=estimator)

    assert loss.item() == pytest.approx(0.34 + 0.1 * kl_sum / 5)
    assert metrics["policy_loss"] == pytest.approx(0.34)
    assert metrics["kl"] == pytest.approx(kl_sum / 5, abs=1e-6)
    # The KL gradient reaches every sampled token, clipped or not, and no masked one.
    surrogate_grad_BT = torch.tensor([[0.0, -0.1, 0.0], [0.0, 0.3, 0.22]])
    expected_BT = surrogate_grad_BT + 0.1 * torch.tensor(dkl_dlogprob_BT) / 5
    torch.testing.assert_close(_grad(loss, batch), expected_BT)


def test_reference_without_kl_coef_changes_nothing():
    batch = _hand_batch()
    loss, metrics = _policy_loss(batch, kl_coef=0.0)
    assert loss.item() == pytest.approx(0.34)
    assert "kl" not in metrics


def test_garbage_at_masked_positions_never_reaches_loss_or_gradient():
    batch = _hand_batch()
    garbage = _hand_batch()
    with torch.no_grad():
        garbage["logprobs_BT"][0, 2] = -math.inf
    garbage["old_logprobs_BT"][0, 2] = 50.0
    garbage["ref_logprobs_BT"][0, 2] = math.nan
    garbage["advantages_BT"] = torch.tensor([[1.0, 1.0, math.inf], [-1.0, -1.0, -1.0]])
    for kl_estimator in KL_ESTIMATORS:
        loss, _ = _policy_loss(batch, kl_coef=0.1, kl_estimator=kl_estimator)
        garbage_loss, _ = _policy_loss(garbage, kl_coef=0.1, kl_estimator=kl_estimator)
        assert garbage_loss.item() == pytest.approx(loss.item())
        torch.testing.assert_close(_grad(garbage_loss, garbage), _grad(loss, batch))


def test_bool_and_integer_masks_agree():
    batch = _without_ref(_hand_batch())
    bool_loss, _ = _policy_loss({**batch, "mask_BT": batch["mask_BT"].bool()})
    assert bool_loss.item() == pytest.approx(_policy_loss(batch)[0].item())


def test_global_counts_replace_the_batch_counts():
    batch = _without_ref(_hand_batch())
    loss, metrics = _policy_loss(batch, num_tokens=10)
    assert loss.item() == pytest.approx(1.7 / 10)
    assert metrics["loss"] == pytest.approx(1.7 / 5)  # metrics describe this batch alone
    loss, _ = _policy_loss(batch, aggregation="seq-mean-token-mean", num_seqs=4)
    assert loss.item() == pytest.approx((-1.7 / 2 + 3.4 / 3) / 4)


# --------------------------------------------------------------------------- micro-batching


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_micro_batches_with_global_counts_give_the_full_batch_gradient(aggregation, kl_coef):
    batch = _random_batch(seed=1)
    kwargs = {"aggregation": aggregation, "kl_coef": kl_coef, "max_seq_len": 7}
    full_loss, _ = _policy_loss(batch, **kwargs)
    full_grad = _grad(full_loss, batch)

    counts = {"num_tokens": float(batch["mask_BT"].sum()), "num_seqs": 6.0}
    summed_loss, summed_grad = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):  # unequal sizes and token counts
        micro = _rows(batch, rows)
        loss, _ = _policy_loss(micro, **kwargs, **counts)
        summed_loss += loss.item()
        summed_grad.append(_grad(loss, micro))

    assert summed_loss == pytest.approx(full_loss.item())
    torch.testing.assert_close(torch.cat(summed_grad), full_grad)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"old_logprobs_BT": torch.zeros(2, 4)}, r"old_logprobs_BT must have shape \(2, 3\)"),
        ({"mask_BT": torch.ones(3, 3)}, r"mask_BT must have shape \(2, 3\)"),
        ({"advantages_BT": torch.zeros(2, 1)}, r"advantages_BT must have shape \(2, 3\)"),
        ({"is_weights_BT": torch.ones(2, 2)}, r"is_weights_BT must have shape \(2, 3\)"),
        ({"ref_logprobs_BT": torch.zeros(2)}, r"ref_logprobs_BT must have shape \(2, 3\)"),
        ({"logprobs_BT": torch.zeros(6)}, "logprobs_BT must be 2-D"),
        ({"aggregation": "sum"}, "aggregation must be one of 'token-mean', 'seq-mean-token-mean'"),
        ({"kl_estimator": "k4"}, "kl_estimator must be one of 'k1', 'k2', 'k3'; got 'k4'"),
        ({"aggregation": "seq-mean-token-sum-norm"}, "max_seq_len is required"),
        ({"kl_coef": 0.1, "ref_logprobs_BT": None}, "needs ref_logprobs_BT"),
        ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
        ({"clip_low": 1.0}, r"clip_low must be in \[0, 1\)"),
        ({"clip_high": -0.1}, "clip_high must be >= 0"),
        ({"num_tokens": 0}, "num_tokens must be > 0"),
        ({"num_seqs": -1}, "num_seqs must be > 0"),
        ({"max_seq_len": 0}, "max_seq_len must be > 0"),
        ({"ratio_level": "batch"}, "ratio_level must be one of 'token', 'sequence'; got 'batch'"),
    ],
)
def test_policy_loss_rejects_bad_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        _policy_loss(_hand_batch(), **change)


def test_kl_functions_reject_bad_inputs():
    with pytest.raises(ValueError, match="estimator must be one of 'k1', 'k2', 'k3'"):
        kl_estimate(torch.zeros(3), torch.zeros(3), "kl")
    with pytest.raises(ValueError, match=r"ref_logprobs_BT must have shape \(3,\)"):
        kl_estimate(torch.zeros(3), torch.zeros(4), "k1")
    with pytest.raises(ValueError, match=r"rewards_B must have shape \(2,\)"):
        kl_penalized_rewards(torch.zeros(3), *torch.zeros(3, 2, 4), beta=0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        kl_penalized_rewards(torch.zeros(2), *torch.zeros(3, 2, 4), beta=-1.0)


# --------------------------------------------------------------------------- against TRL 1.16


@pytest.fixture(scope="module")
def trl_grpo_trainer():
    return pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer


class _OneProcessAccelerator:
    """The members of ``accelerate.Accelerator`` that TRL's loss reads, for one process."""

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction):
        return tensor


class _FixedLogprobsModel:
    """Stands in for TRL's model: its forward returns the given completion log-probs.

    TRL 1.16 calls ``model(input_ids, attention_mask, labels, fused_lm_head=True)`` and reads
    ``.log_probs`` and ``.entropy`` over prompt + completion; the prompt here is one token.
    """

    training = True

    def __init__(self, logprobs_BT: torch.Tensor):
        self.logprobs_BT = logprobs_BT

    def __call__(self, *, input_ids, attention_mask, labels, fused_lm_head):
        log_probs = torch.cat([self.logprobs_BT.new_zeros(len(input_ids), 1), self.logprobs_BT], 1)
        return types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs))


def _trl_loss(
    GRPOTrainer,
    batch: dict[str, torch.Tensor],
    *,
    loss_type: str,
    beta: float,
    max_completion_length: int,
    num_items_in_batch: float | None = None,
    accumulation_steps: int = 1,
    importance_sampling_level: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Run TRL's own ``GRPOTrainer._compute_loss`` on ``batch`` (clip range 0.8-1.28).

    ``self`` is a stand-in carrying only the attributes that method reads in TRL 1.16 with
    token-level importance sampling, no vLLM, no entropy mask or bonus; TRL's
    ``_get_per_token_logps_and_entropies`` runs for real on a model stub.
    """
    model = _FixedLogprobsModel(batch["logprobs_BT"])
    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(
            use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation_steps
        ),
        model=model,
        accelerator=_OneProcessAccelerator(),
        loss_type=loss_type,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=max_completion_length,
        current_gradient_accumulation_steps=accumulation_steps,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    trainer._get_per_token_logps_and_entropies = types.MethodType(
        GRPOTrainer._get_per_token_logps_and_entropies, trainer
    )
    B, T = batch["mask_BT"].shape
    mask_BT = batch["mask_BT"].long()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask_BT,
        "advantages": batch["advantages_B"],
        "old_per_token_logps": batch["old_logprobs_BT"],
        "ref_per_token_logps": batch["ref_logprobs_BT"],
        "num_items_in_batch": torch.tensor(
            float(mask_BT.sum()) if num_items_in_batch is None else num_items_in_batch
        ),
    }
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


_TRL_LOSS_TYPES = [
    ("dapo", "token-mean"),
    ("bnpo", "token-mean"),
    ("grpo", "seq-mean-token-mean"),
    ("dr_grpo", "seq-mean-token-sum-norm"),
]


@pytest.mark.parametrize(("loss_type", "aggregation"), _TRL_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_trl_grpo_loss_on_one_batch(trl_grpo_trainer, loss_type, aggregation, beta, seed):
    """One batch, no accumulation: TRL "dapo"/"bnpo" are our token-mean, "grpo" our
    seq-mean-token-mean, "dr_grpo" our seq-mean-token-sum-norm with max_seq_len =
    max_completion_length. TRL's KL (``beta``) is k3 in the loss: our ``kl_coef`` with
    ``kl_estimator="k3"``. Loss, gradient, clip fractions and KL must all agree."""
    ours_batch, trl_batch = _random_batch(seed), _random_batch(seed)
    ours, metrics = _policy_loss(
        ours_batch,
        clip_high=0.28,
        aggregation=aggregation,
        kl_coef=beta,
        max_seq_len=9,
    )
    theirs, trl_metrics = _trl_loss(
        trl_grpo_trainer, trl_batch, loss_type=loss_type, beta=beta, max_completion_length=9
    )

    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(_grad(ours, ours_batch), _grad(theirs, trl_batch))
    assert metrics["clip_frac_low"] == pytest.approx(trl_metrics["clip_ratio/low_mean"])
    assert metrics["clip_frac_high"] == pytest.approx(trl_metrics["clip_ratio/high_mean"])
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1
    if beta:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"])


@pytest.mark.parametrize(
    ("loss_type", "aggregation"), [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean")]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_level_ratios_match_trl_gspo(trl_grpo_trainer, loss_type, aggregation, seed):
    """GSPO: TRL's ``importance_sampling_level="sequence"`` is our ``ratio_level``."""
    ours_batch, trl_batch = _random_batch(seed), _random_batch(seed)
    ours, _ = _policy_loss(
        ours_batch, clip_high=0.28, aggregation=aggregation, ratio_level="sequence"
    )
    theirs, _ = _trl_loss(
        trl_grpo_trainer,
        trl_batch,
        loss_type=loss_type,
        beta=0.0,
        max_completion_length=9,
        importance_sampling_level="sequence",
    )

    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(_grad(ours, ours_batch), _grad(theirs, trl_batch))
    token_level, _ = _policy_loss(_random_batch(seed), clip_high=0.28, aggregation=aggregation)
    assert not torch.isclose(ours, token_level)  # the level changes the loss on this batch


def test_a_sequence_ratio_is_the_geometric_mean_of_its_token_ratios():
    logprobs = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.1, -2.3]])  # token log-ratios 0.1 and 0.3: mean 0.2
    mask = torch.tensor([[0.0, 1.0, 1.0]])

    loss, metrics = policy_loss(
        logprobs,
        PolicyLossInputs(old, advantages_BT=torch.ones(1, 3), mask_BT=mask),
        PolicyLossSettings(clip_high=0.5, ratio_level="sequence"),
    )

    assert loss.item() == pytest.approx(-math.exp(0.2))
    assert metrics["ratio_mean"] == pytest.approx(math.exp(0.2))


def test_matches_trl_on_the_hand_batch(trl_grpo_trainer):
    ours_batch, trl_batch = _hand_batch(), _hand_batch()
    ours, _ = _policy_loss(ours_batch, clip_high=0.28, kl_coef=0.04)
    theirs, _ = _trl_loss(
        trl_grpo_trainer, trl_batch, loss_type="dapo", beta=0.04, max_completion_length=3
    )
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(_grad(ours, ours_batch), _grad(theirs, trl_batch))


@pytest.mark.parametrize(
    ("loss_type", "aggregation"), [t for t in _TRL_LOSS_TYPES if t[0] != "bnpo"]
)
def test_matches_trl_under_gradient_accumulation(trl_grpo_trainer, loss_type, aggregation):
    """Two micro-batches of 3 sequences (TRL's micro-batches always have equal sizes).

    TRL "dapo" divides by the generation batch's token count (``num_items_in_batch``);
    "grpo" and "dr_grpo" divide each micro-batch's loss by the number of accumulation steps,
    which with equal micro-batch sizes is our division by the global ``num_seqs``. So each
    micro-batch's TRL loss equals ours with the step's global counts."""
    batch = _random_batch(seed=2)
    counts = {"num_tokens": float(batch["mask_BT"].sum()), "num_seqs": 6.0}
    for rows in (slice(0, 3), slice(3, 6)):
        ours_micro, trl_micro = _rows(batch, rows), _rows(batch, rows)
        ours, _ = _policy_loss(
            ours_micro, clip_high=0.28, aggregation=aggregation, max_seq_len=9, **counts
        )
        theirs, _ = _trl_loss(
            trl_grpo_trainer,
            trl_micro,
            loss_type=loss_type,
            beta=0.0,
            max_completion_length=9,
            num_items_in_batch=counts["num_tokens"],
            accumulation_steps=2,
        )
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(_grad(ours, ours_micro), _grad(theirs, trl_micro))


def test_trl_bnpo_under_accumulation_averages_micro_batch_token_means(trl_grpo_trainer):
    """Definitional difference: TRL "bnpo" takes each micro-batch's own token mean and
    divides by the number of accumulation steps, so micro-batches with fewer tokens weigh
    each token more. Our token-mean with the step's ``num_tokens`` (TRL "dapo") weighs every
    token of the step equally. They agree only when micro-batches hold equal token counts;
    here they do not, and TRL's value is our per-micro-batch token mean halved."""
    batch = _random_batch(seed=2)
    tokens_per_micro = [int(batch["mask_BT"][rows].sum()) for rows in (slice(0, 3), slice(3, 6))]
    assert tokens_per_micro[0] != tokens_per_micro[1]
    for rows in (slice(0, 3), slice(3, 6)):
        micro = _rows(batch, rows)
        local_mean, _ = _policy_loss(_without_ref(micro), clip_high=0.28)
        global_mean, _ = _policy_loss(
            _without_ref(micro), clip_high=0.28, num_tokens=float(batch["mask_BT"].sum())
        )
        theirs, _ = _trl_loss(
            trl_grpo_trainer,
            micro,
            loss_type="bnpo",
            beta=0.0,
            max_completion_length=9,
            accumulation_steps=2,
        )
        torch.testing.assert_close(theirs, local_mean / 2)
        assert not torch.isclose(theirs, global_mean)
