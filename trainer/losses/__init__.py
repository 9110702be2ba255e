"""Losses for training language models: pure functions, tensors in, ``(loss, metrics)`` out.

Every function here is synchronous and stateless: no model, no optimizer. Token-level
losses follow the ``TokenBatch``'s contract: ``B`` sequences of ``T`` right-padded
positions, ``mask_BT`` 1 on the tokens trained on, and values at masked positions never
reach a loss or its gradient. Each loss divides by the whole optimizer step's count
(tokens, sequences, pairs) when given one, so micro-batch losses add up to the batch's.

What lives where:

==================  =====================================================================
module              contents
==================  =====================================================================
``policy``          ``policy_loss`` over ``PolicyLossInputs`` and ``PolicyLossSettings``:
                    GRPO, DAPO, Dr.GRPO, GSPO and PPO's actor
``kl``              ``kl_estimate`` (k1, k2, k3) and ``kl_penalized_rewards``
``importance``      ``behaviour_weights``: truncated IS from the sampling engine
``value``           ``value_loss``: PPO's critic
``supervised``      ``sft_loss``
``preference``      DPO (cDPO), IPO, SimPO, ORPO over ``PairLogps`` and
                    ``PreferenceSettings``, in the table ``PREFERENCE_LOSSES``
``kto``             ``kto_loss`` on unpaired answers
``reward_model``    ``bradley_terry_loss``
==================  =====================================================================

GRPO, DAPO and Dr.GRPO are one function, ``policy_loss``, with different settings:

=========  =================================  ==============================================
recipe     advantages                         ``PolicyLossSettings``
=========  =================================  ==============================================
GRPO       ``grouped_advantages``             ``aggregation="seq-mean-token-mean"``
DAPO       ``grouped_advantages``             ``clip_high=0.28``, ``"token-mean"``
Dr.GRPO    ``scale_by_std=False``             ``"seq-mean-token-sum-norm"``, ``max_seq_len``
GSPO       ``grouped_advantages``             ``ratio_level="sequence"``
=========  =================================  ==============================================

The KL to the reference model goes either into the reward (``kl_penalized_rewards``, the
default placement: the k1 estimate there gives an unbiased penalty on the sequence) or
into the loss (``PolicyLossSettings.kl_coef`` with ``PolicyLossInputs.ref_logprobs_BT``,
the GRPO paper's placement, usually with k3). Option names (aggregations, estimators,
ratio levels, preference-loss names) are defined in ``palaestra.options``.

Where a new loss goes: a variant of an existing loss is a new field of its settings record
(validated in ``__post_init__``), not a copy. A new pairwise preference loss is one
function ``(PairLogps, PreferenceSettings) -> (loss, metrics)`` in ``preference.py`` ending
in ``_pair_result``, an entry in ``PREFERENCE_LOSSES`` and its name in
``options.PreferenceLossName``. Any other loss is one pure function (under ~60 lines, the
paper, formula and shapes in its docstring, metrics in a helper beside it) in the module of
its family, or a new module here listed in the table above, and a hand-computed test in
``tests/trainer``. This package computes no log-probabilities (``trainer.learner``) and no
advantages (``trainer.advantages``).
"""

from __future__ import annotations

from palaestra.trainer.losses.importance import behaviour_weights
from palaestra.trainer.losses.kl import kl_estimate, kl_penalized_rewards
from palaestra.trainer.losses.kto import kto_loss
from palaestra.trainer.losses.policy import PolicyLossInputs, PolicyLossSettings, policy_loss
from palaestra.trainer.losses.preference import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceLoss,
    PreferenceSettings,
    dpo_sigmoid,
    ipo,
    orpo,
    preference_loss,
    simpo,
)
from palaestra.trainer.losses.reward_model import bradley_terry_loss
from palaestra.trainer.losses.supervised import sft_loss
from palaestra.trainer.losses.value import value_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "PairLogps",
    "PolicyLossInputs",
    "PolicyLossSettings",
    "PreferenceLoss",
    "PreferenceSettings",
    "behaviour_weights",
    "bradley_terry_loss",
    "dpo_sigmoid",
    "ipo",
    "kl_estimate",
    "kl_penalized_rewards",
    "kto_loss",
    "orpo",
    "policy_loss",
    "preference_loss",
    "sft_loss",
    "simpo",
    "value_loss",
]
