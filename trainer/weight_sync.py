"""Weight-sync verification: does the engine sample with the weights the learner sent?

A sync can fail silently: a renamed tensor the engine skips, a tied embedding loaded under
one name only, a prefix cache still holding keys and values of the old weights, a load
that raised in a worker process and was swallowed. Each of these leaves the engine
sampling from a policy other than the learner's, and the importance ratios of the next
step are then wrong without any error.

``verify_engine_weights`` asks the engine for the logprobs of a probe sequence
(``Engine.score``) and compares them with the learner's own ``token_logprobs`` of the
same tokens, in float32 and at temperature 1. It raises ``WeightSyncError`` when the
largest difference exceeds the tolerance. The tolerance has to cover the engine's
numerics: a float32 engine agrees with the learner to ~1e-4 nats; a bfloat16 one, on
SmolLM2-135M, to ~0.04 nats on average and ~0.3 at most over a hundred tokens (see
``default_tolerance``); weights that did not arrive are off by nats. It is a check for a
sync that failed, not for a small drift that bfloat16 rounding would hide.

Not here: sending the weights (``Engine.update_weights``) or deciding when to check (the
stage loop does, every ``verify_every`` steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from palaestra.agent.engines.base import Engine
from palaestra.trainer.batch import TokenBatch
from palaestra.trainer.errors import WeightSyncError
from palaestra.trainer.learner import token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_DEFAULT_TOLERANCES = {"float32": 1e-2, "bfloat16": 1.0}


@dataclass(frozen=True)
class SyncCheck:
    """How closely the engine's logprobs of a probe sequence match the learner's."""

    max_abs_dlogprob: float
    """Largest |engine logprob - learner logprob| over the probe's tokens, in nats."""
    mean_abs_dlogprob: float
    """Mean |engine logprob - learner logprob| over the probe's tokens, in nats."""
    num_tokens: int
    """Tokens compared (the probe's length minus one)."""
    policy_version: int
    """The engine's policy version when it scored the probe."""


def default_tolerance(engine_dtype: str) -> float:
    """Largest |Δ logprob| a correct sync shows for an engine running in ``engine_dtype``."""
    return _DEFAULT_TOLERANCES[engine_dtype]


async def verify_engine_weights(
    engine: Engine, model: PreTrainedModel, probe_ids: Sequence[int], *, tolerance: float
) -> SyncCheck:
    """Compare the engine's and ``model``'s logprobs of ``probe_ids``; raise if they differ.

    Raises ``WeightSyncError`` (with the max and mean |Δ|) when the largest difference is
    above ``tolerance``, or when the engine returns the wrong number of logprobs.
    """
    if len(probe_ids) < 2:
        raise ValueError(f"probe_ids needs at least 2 tokens, got {len(probe_ids)}")
    engine_N = torch.tensor(await engine.score(list(probe_ids)), dtype=torch.float32)
    learner_N = learner_logprobs(model, probe_ids)
    if engine_N.shape != learner_N.shape:
        raise WeightSyncError(
            f"the engine scored {engine_N.numel()} tokens of a {len(probe_ids)}-token probe; "
            f"expected {learner_N.numel()}"
        )
    delta_N = (engine_N - learner_N).abs()
    check = SyncCheck(
        max_abs_dlogprob=float(delta_N.max()),
        mean_abs_dlogprob=float(delta_N.mean()),
        num_tokens=int(delta_N.numel()),
        policy_version=engine.policy_version,
    )
    if not check.max_abs_dlogprob <= tolerance:  # also catches NaN
        raise WeightSyncError(
            f"the engine (policy version {check.policy_version}) and the learner disagree on "
            f"a {len(probe_ids)}-token probe: max |Δ logprob| {check.max_abs_dlogprob:.4g} > "
            f"tolerance {tolerance:.4g} (mean {check.mean_abs_dlogprob:.4g}); the engine is "
            "not sampling with the learner's weights (a tensor not loaded, a stale cache, "
            "or a different model)"
        )
    return check


@torch.no_grad()
def learner_logprobs(model: PreTrainedModel, token_ids: Sequence[int]) -> torch.Tensor:
    """Float32 logprobs of ``token_ids[1:]`` under ``model`` at temperature 1, on the CPU."""
    device = next(model.parameters()).device
    ids_1T = torch.tensor([list(token_ids)], device=device)
    ones_1T = torch.ones_like(ids_1T)
    probe = TokenBatch(input_ids_BT=ids_1T, attention_mask_BT=ones_1T, loss_mask_BT=ones_1T.float())
    was_training = model.training
    model.eval()
    try:
        return token_logprobs(model, probe)[0, 1:].float().cpu()
    finally:
        model.train(was_training)
