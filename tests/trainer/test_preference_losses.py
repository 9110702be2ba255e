"""SFT, the DPO family, KTO, Bradley-Terry and PPO's value loss: hand values, then TRL.

Each loss is checked twice: against numbers worked out by hand in the test, and against
TRL 1.16's own code run on the same tensors (its trainers' loss methods called on a small
stand-in ``self``). Where TRL's definition differs, the test pins the difference.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from palaestra.options import PREFERENCE_LOSS_NAMES
from palaestra.trainer.losses import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceSettings,
    bradley_terry_loss,
    kto_loss,
    preference_loss,
    sft_loss,
    value_loss,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


T = torch.tensor


def pairs(chosen, rejected, *, ref=(None, None), lengths=None, num_pairs=None) -> PairLogps:
    """``PairLogps`` of summed log-probs; ``lengths`` (chosen, rejected) default to 1 token
    each, which DPO (``sigmoid``) never reads."""
    chosen_lengths, rejected_lengths = lengths or (torch.ones_like(chosen),) * 2
    return PairLogps(chosen, rejected, chosen_lengths, rejected_lengths, *ref, num_pairs=num_pairs)


# --- hand values ---------------------------------------------------------------------------


def test_sft_loss_is_the_token_mean_nll_of_the_target_tokens():
    logprobs = T([[-9.0, -1.0, -2.0], [-9.0, -3.0, -9.0]])
    mask = T([[0, 1, 1], [0, 1, 0]])
    loss, metrics = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx((1 + 2 + 3) / 3)
    # normalised by the step's token count: two micro-batches add up to the whole
    a, _ = sft_loss(logprobs[:1], mask[:1], num_tokens=3)
    b, _ = sft_loss(logprobs[1:], mask[1:], num_tokens=3)
    assert (a + b).item() == pytest.approx(loss.item())
    assert metrics["loss"] == pytest.approx(2.0)


def test_dpo_sigmoid_by_hand():
    # pair 0: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2.5) = -0.5, d = 1.5
    # pair 1: chosen 0 - 0 = 0, rejected -1 - (-2) = 1, d = -1
    beta = 0.5
    loss, m = preference_loss(
        "sigmoid",
        pairs(T([-1.0, 0.0]), T([-3.0, -1.0]), ref=(T([-2.0, 0.0]), T([-2.5, -2.0]))),
        PreferenceSettings(beta=beta),
    )
    expected = (-logsig(0.5 * 1.5) - logsig(0.5 * -1.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx((0.5 * 1 + 0.5 * 0) / 2)
    assert m["rewards/rejected"] == pytest.approx((0.5 * -0.5 + 0.5 * 1) / 2)
    assert m["rewards/margin"] == pytest.approx((0.75 - 0.5) / 2)
    assert m["rewards/accuracy"] == 0.5


def test_cdpo_label_smoothing_by_hand():
    # d = (−1 − −2) − (−3 − −2.5) = 1.5, beta d = 0.15
    e = 0.1
    loss, _ = preference_loss(
        "sigmoid",
        pairs(T([-1.0]), T([-3.0]), ref=(T([-2.0]), T([-2.5]))),
        PreferenceSettings(beta=0.1, label_smoothing=e),
    )
    assert loss.item() == pytest.approx(-(1 - e) * logsig(0.15) - e * logsig(-0.15), rel=1e-6)


def test_ipo_uses_per_token_log_ratios():
    # chosen: (-4 - -6) / 4 = 0.5 per token; rejected: (-6 - -3) / 2 = -1.5; d = 2
    beta = 0.25
    ipo_pair = pairs(T([-4.0]), T([-6.0]), ref=(T([-6.0]), T([-3.0])), lengths=(T([4]), T([2])))
    loss, _ = preference_loss("ipo", ipo_pair, PreferenceSettings(beta=beta))
    assert loss.item() == pytest.approx((2.0 - 1 / (2 * beta)) ** 2)  # (2 - 2)^2 = 0
    loss, _ = preference_loss("ipo", ipo_pair, PreferenceSettings(beta=1.0))
    assert loss.item() == pytest.approx((2.0 - 0.5) ** 2)


def test_simpo_is_reference_free_and_length_normalised():
    # mean logps: chosen -6/3 = -2, rejected -4/1 = -4; beta 2, gamma 1: 2 * 2 - 1 = 3
    loss, m = preference_loss(
        "simpo",
        pairs(T([-6.0]), T([-4.0]), lengths=(T([3]), T([1]))),
        PreferenceSettings(beta=2.0, simpo_gamma=1.0),
    )
    assert loss.item() == pytest.approx(-logsig(3.0), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(-4.0) and m["rewards/rejected"] == pytest.approx(
        -8.0
    )


def test_orpo_is_nll_plus_the_odds_ratio_term():
    # mean logps m_c = -1/2 = -0.5, m_r = -3/2 = -1.5; log odds(m) = m - log(1 - e^m)
    m_c, m_r, beta = -0.5, -1.5, 0.1
    log_odds = (m_c - math.log(1 - math.exp(m_c))) - (m_r - math.log(1 - math.exp(m_r)))
    loss, _ = preference_loss(
        "orpo",
        pairs(T([-1.0]), T([-3.0]), lengths=(T([2]), T([2]))),
        PreferenceSettings(beta=beta),
    )
    assert loss.item() == pytest.approx(0.5 - beta * logsig(log_odds), rel=1e-6)


def test_pairs_split_over_micro_batches_add_up_to_the_whole_batch():
    c = torch.tensor([-1.0, -2.0, -0.5, -4.0], requires_grad=True)
    r = torch.tensor([-2.0, -1.0, -3.0, -4.5], requires_grad=True)
    ref_c, ref_r = T([-1.5, -1.5, -1.0, -3.0]), T([-1.5, -1.5, -2.0, -4.0])
    settings = PreferenceSettings(beta=0.3)
    whole, _ = preference_loss("sigmoid", pairs(c, r, ref=(ref_c, ref_r)), settings)
    (g_whole_c,) = torch.autograd.grad(whole, c)
    parts = sum(
        preference_loss(
            "sigmoid", pairs(c[s], r[s], ref=(ref_c[s], ref_r[s]), num_pairs=4), settings
        )[0]
        for s in (slice(0, 1), slice(1, 4))
    )
    (g_parts_c,) = torch.autograd.grad(parts, c)
    assert parts.item() == pytest.approx(whole.item())
    torch.testing.assert_close(g_parts_c, g_whole_c)


def test_preference_losses_refuse_missing_inputs():
    settings = PreferenceSettings(beta=0.1)
    with pytest.raises(ValueError, match="reference model"):
        preference_loss("sigmoid", pairs(T([-1.0]), T([-2.0])), settings)
    with pytest.raises(ValueError, match=r"chosen_lengths_P must have shape \(1,\)"):
        pairs(T([-1.0]), T([-2.0]), lengths=(T([]), T([1])))
    with pytest.raises(ValueError, match=r"ref_rejected_P must have shape \(1,\)"):
        pairs(T([-1.0]), T([-2.0]), ref=(T([-1.0]), T([-1.0, -2.0])))
    with pytest.raises(ValueError, match="num_pairs must be > 0"):
        pairs(T([-1.0]), T([-2.0]), num_pairs=0)
    with pytest.raises(ValueError, match="loss must be one of 'sigmoid', 'ipo', 'simpo', 'orpo'"):
        preference_loss("hinge", pairs(T([-1.0]), T([-2.0])), settings)


def test_every_preference_loss_name_is_in_the_table():
    assert tuple(PREFERENCE_LOSSES) == PREFERENCE_LOSS_NAMES
    for name, entry in PREFERENCE_LOSSES.items():
        assert entry.name == name
        assert entry.needs_reference is (name not in ("simpo", "orpo"))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"simpo_gamma": -1.0}, "simpo_gamma must be >= 0"),
    ],
)
def test_preference_settings_reject_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        PreferenceSettings(**change)


def test_kto_by_hand():
    # z = logp - ref: desirable 1.0, undesirable -0.5 and 0.5; KL estimate 0.2; beta 0.5
    loss, m = kto_loss(
        T([-1.0, -3.0, -1.5]),
        T([-2.0, -2.5, -2.0]),
        T([True, False, False]),
        kl=0.2,
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    expected = (
        (1 - sig(0.5 * (1.0 - 0.2)))
        + 2.0 * (1 - sig(0.5 * (0.2 - -0.5)))
        + 2.0 * (1 - sig(0.5 * (0.2 - 0.5)))
    ) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["kl"] == pytest.approx(0.2)
    # a negative KL estimate is clamped to 0: the reference point never rewards drifting
    clamped, m = kto_loss(T([-1.0]), T([-2.0]), T([True]), kl=-0.7, beta=0.5)
    assert clamped.item() == pytest.approx(1 - sig(0.5))
    assert m["kl"] == 0.0


def test_bradley_terry_by_hand():
    loss, m = bradley_terry_loss(T([2.0, 0.0]), T([1.0, 0.5]))
    assert loss.item() == pytest.approx((-logsig(1.0) - logsig(-0.5)) / 2, rel=1e-6)
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(0.25)
    with_margin, _ = bradley_terry_loss(T([2.0]), T([1.0]), margin_P=T([0.5]))
    assert with_margin.item() == pytest.approx(-logsig(0.5), rel=1e-6)


def test_value_loss_by_hand_with_and_without_clipping():
    values = T([[0.0, 1.0, 0.5, 9.0]])
    old = T([[0.0, 0.6, 0.4, 0.0]])
    returns = T([[0.0, 0.0, 1.0, 0.0]])
    mask = T([[0, 1, 1, 0]])
    # unclipped: 0.5 * ((1 - 0)^2 + (0.5 - 1)^2) / 2
    loss, _ = value_loss(values, old, returns, mask)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    # clip 0.2: token 1: V clipped to 0.8, max(1, 0.64) = 1; token 2: V 0.5 is within 0.4 +- 0.2,
    # max(0.25, 0.25) = 0.25; a clip that helps the target never lowers the error (max)
    clipped, m = value_loss(values, old, returns, mask, clip=0.2)
    assert clipped.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    assert m["value_clip_frac"] == pytest.approx(0.5)
    # token 1 with the target above: V 1.0, old 0.6, R 2.0: unclipped 1.0, clipped (0.8 - 2)^2 = 1.44
    clipped, _ = value_loss(T([[1.0]]), T([[0.6]]), T([[2.0]]), T([[1]]), clip=0.2)
    assert clipped.item() == pytest.approx(0.5 * 1.44)


# --- against TRL ---------------------------------------------------------------------------


class _Accelerator:
    """The members of ``accelerate.Accelerator`` TRL's preference losses read, one process."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


class _FixedLogps(torch.nn.Module):
    """A model stub whose fused-LM-head output carries fixed per-token log-probs."""

    def __init__(self, per_token_logps_BT: torch.Tensor) -> None:
        super().__init__()
        self.logps_BT = per_token_logps_BT

    def forward(self, **_: object) -> types.SimpleNamespace:
        zeros = torch.zeros_like(self.logps_BT)
        return types.SimpleNamespace(
            log_probs=self.logps_BT, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def _token_logps(sums: list[float], lengths: list[int], width: int = 6) -> torch.Tensor:
    """Rows of per-token log-probs (after the one prompt token) summing to ``sums``."""
    rows = torch.zeros(len(sums), width - 1)
    for i, (total, n) in enumerate(zip(sums, lengths, strict=True)):
        rows[i, :n] = total / n
    return rows


def _completion_mask(lengths: list[int], width: int = 6) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 1 : 1 + n] = 1
    return mask


def _trl_dpo(loss_type: str, beta: float, chosen, rejected, ref_c, ref_r, lc, lr) -> float:
    from trl.trainer.dpo_trainer import DPOTrainer

    lengths = lc + lr  # TRL's batch is [chosen..., rejected...]
    model = _FixedLogps(_token_logps(chosen + rejected, lengths))
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    mask = _completion_mask(lengths)
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": T(ref_c),
        "ref_rejected_logps": T(ref_r),
    }
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False).item()


PAIRS = {
    "chosen": [-4.0, -2.5, -7.0],
    "rejected": [-5.0, -1.0, -6.5],
    "ref_c": [-4.5, -2.0, -6.0],
    "ref_r": [-4.0, -2.0, -8.0],
    "lc": [2, 5, 3],
    "lr": [4, 1, 3],
}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl(loss_type):
    p = PAIRS
    ours, _ = preference_loss(
        loss_type,
        pairs(
            T(p["chosen"]),
            T(p["rejected"]),
            ref=(T(p["ref_c"]), T(p["ref_r"])),
            lengths=(T(p["lc"]), T(p["lr"])),
        ),
        PreferenceSettings(beta=0.2),
    )
    trl = _trl_dpo(loss_type, 0.2, *p.values())
    assert ours.item() == pytest.approx(trl, rel=1e-5)


def test_cdpo_matches_trls_cpo_sigmoid_with_label_smoothing():
    """TRL 1.16's DPOTrainer 'sigmoid' no longer takes label smoothing (its 'robust' is rDPO,
    another estimator); the cDPO form lives on in CPOTrainer's 'sigmoid', whose logits are
    log-prob differences: fed DPO's log-ratio differences it is exactly cDPO."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    p, e, beta = PAIRS, 0.15, 0.2
    ratio_c = T(p["chosen"]) - T(p["ref_c"])
    ratio_r = T(p["rejected"]) - T(p["ref_r"])
    trainer = types.SimpleNamespace(
        alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=e, accelerator=_Accelerator()
    )
    trl_losses, _, _ = CPOTrainer.cpo_loss(trainer, ratio_c, ratio_r)
    ours, _ = preference_loss(
        "sigmoid",
        pairs(T(p["chosen"]), T(p["rejected"]), ref=(T(p["ref_c"]), T(p["ref_r"]))),
        PreferenceSettings(beta=beta, label_smoothing=e),
    )
    assert ours.item() == pytest.approx(trl_losses.mean().item(), rel=1e-6)


def test_simpo_matches_trl_cpo_simpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    p, beta, gamma = PAIRS, 2.0, 0.7
    mean_c = T(p["chosen"]) / T(p["lc"])  # TRL averages log-probs per token for SimPO
    mean_r = T(p["rejected"]) / T(p["lr"])
    trainer = types.SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=0.0,
        accelerator=_Accelerator(),
    )
    trl_losses, trl_chosen, _ = CPOTrainer.cpo_loss(trainer, mean_c, mean_r)
    ours, m = preference_loss(
        "simpo",
        pairs(T(p["chosen"]), T(p["rejected"]), lengths=(T(p["lc"]), T(p["lr"]))),
        PreferenceSettings(beta=beta, simpo_gamma=gamma),
    )
    assert ours.item() == pytest.approx(trl_losses.mean().item(), rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(trl_chosen.mean().item(), rel=1e-6)


def test_orpo_matches_trl_odds_ratio_loss():
    """TRL's ORPO loss is ``nll - mean(odds_ratio_loss)`` with the NLL averaged over all
    chosen tokens of the batch; ours averages each pair's NLL. Equal lengths: identical."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    beta = 0.25
    chosen, rejected, lengths = T([-1.0, -3.0, -2.0]), T([-2.0, -2.5, -6.0]), T([2, 2, 2])
    trainer = types.SimpleNamespace(beta=beta, accelerator=_Accelerator())
    trl_or, *_ = ORPOTrainer.odds_ratio_loss(trainer, chosen / lengths, rejected / lengths)
    trl_nll = -(chosen.sum() / lengths.sum())  # token mean over the batch's chosen tokens
    settings = PreferenceSettings(beta=beta)
    ours, _ = preference_loss("orpo", pairs(chosen, rejected, lengths=(lengths, lengths)), settings)
    assert ours.item() == pytest.approx((trl_nll - trl_or.mean()).item(), rel=1e-6)
    # unequal lengths: only the NLL term differs, by exactly the two averages' difference
    uneven = T([1, 3, 2])
    ours, _ = preference_loss("orpo", pairs(chosen, rejected, lengths=(uneven, lengths)), settings)
    trl_or, *_ = ORPOTrainer.odds_ratio_loss(trainer, chosen / uneven, rejected / lengths)
    per_pair_nll = -(chosen / uneven).mean()
    assert ours.item() == pytest.approx((per_pair_nll - trl_or.mean()).item(), rel=1e-6)


def test_kto_matches_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    logps, ref = [-3.0, -2.0, -5.0, -1.0], [-2.5, -2.5, -4.0, -1.5]
    labels, lengths = [True, False, True, False], [2, 3, 1, 4]
    kl_logps, ref_kl_logps = T([-3.0, -4.0, -2.0, -2.5]), T([-3.5, -3.0, -2.5, -2.0])
    model = _FixedLogps(_token_logps(logps, lengths))
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=0.3,
        desirable_weight=1.0,
        undesirable_weight=1.5,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        _compute_kl_logps=lambda model, batch: kl_logps,
    )
    mask = _completion_mask(lengths)
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "label": T(labels),
        "ref_logps": T(ref),
        "ref_KL_logps": ref_kl_logps,
    }
    trl = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    # TRL orders the losses desirable first; the mean does not care
    kl = (kl_logps - ref_kl_logps).mean()
    ours, _ = kto_loss(
        T(logps), T(ref), T(labels), kl=kl, beta=0.3, desirable_weight=1.0, undesirable_weight=1.5
    )
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)


def test_bradley_terry_matches_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    chosen, rejected, margin = T([1.5, -0.2, 0.3]), T([0.5, 0.4, 0.3]), T([0.1, 0.0, 0.5])

    class Scores(torch.nn.Module):  # TRL's batch is [chosen..., rejected...]
        def forward(self, **_: object) -> types.SimpleNamespace:
            return types.SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])

    model = Scores()
    trainer = types.SimpleNamespace(
        model=model,
        args=types.SimpleNamespace(center_rewards_coefficient=None),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": torch.ones(6, 2), "attention_mask": torch.ones(6, 2), "margin": margin}
    trl = RewardTrainer.compute_loss(trainer, model, inputs)
    ours, _ = bradley_terry_loss(chosen, rejected, margin_P=margin)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-6)
