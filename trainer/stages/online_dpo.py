"""Online DPO stage: preference pairs from the model's own rollouts in any env.

Iterative (online) DPO: sample, judge with the env's reward, prefer the better episode.
Rollouts, infrastructure-failure filtering, weight sync, logging and evaluation are the
on-policy loop's (``stages.onpolicy``); this module is its update, top to bottom:

1. **pair**: within each group (episodes of one task), the best episode is paired with
   the worst, the second best with the second worst, and so on, up to
   ``dpo.pairs_per_group`` pairs, while the better one's reward is strictly higher; a group
   whose rewards are all equal gives no pair and is counted.
2. **score**: each episode's log-prob is the sum over the tokens the model SAMPLED, in
   every turn: prompt, tool results and env messages are masked out, and an episode the
   chat template split into several samples sums over all of them. The reference (the
   stage's starting model, frozen) scores each paired episode once.
3. **step**: the ``dpo.loss`` preference loss (``sigmoid``/cDPO, ``ipo``, or the
   reference-free ``simpo``/``orpo``) over the pairs, one AdamW step. A step with no pair
   trains nothing and says so in its metrics.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from palaestra.agent.trajectory import Trajectory
from palaestra.config import OnlineDPOStage
from palaestra.rundir import RunDir
from palaestra.trainer.batch import TokenBatch, collate
from palaestra.trainer.learner import Learner, LossFn
from palaestra.trainer.policy_gradient import with_reference
from palaestra.trainer.preference import needs_reference, pair_loss
from palaestra.trainer.stages.common import StageResult, reference_policy
from palaestra.trainer.stages.onpolicy import Policy, run_on_policy


def run_online_dpo(cfg: OnlineDPOStage, run: RunDir) -> StageResult:
    """Run an online DPO stage as configured, writing into ``run``."""
    return run_on_policy(
        cfg, run, lambda policy: OnlineDPOUpdate(cfg, policy), dynamic_sampling=cfg.grpo
    )


class OnlineDPOUpdate:
    """Best-versus-worst pairs within each group, one preference-loss step."""

    def __init__(self, cfg: OnlineDPOStage, policy: Policy) -> None:
        self.cfg, self.policy = cfg, policy
        # the reference is the stage's starting model: the policy before its first step
        self.reference = reference_policy(policy.model) if needs_reference(cfg.dpo.loss) else None

    def __call__(self, trajectories: list[Trajectory]) -> dict[str, float]:
        pairs, without = preference_pairs(trajectories, self.cfg.dpo.pairs_per_group)
        counts = {
            "online_dpo/pairs": float(len(pairs)),
            "online_dpo/groups_without_pair": float(without),
        }
        if not pairs:
            return counts | {"online_dpo/skipped_update": 1.0}
        episodes = [tr for pair in pairs for tr in pair]  # chosen0, rejected0, chosen1, ...
        learner = self.policy.learner
        batch = collate(episodes, pad_id=self.policy.tokenizer.pad_token_id)
        batch = with_reference(learner, self.reference, batch)
        # micro-batches hold whole pairs: two rows each, or the whole batch when split
        # episodes spread over more rows
        size = learner.settings.micro_batch_size
        micro = len(batch) if len(batch) != len(episodes) else max(2, size // 2 * 2)
        return counts | learner.step(batch, self._loss(len(pairs)), micro_batch_size=micro)

    def finish(self, run: RunDir) -> None:
        """Online DPO owns nothing besides the policy."""

    def learners(self) -> dict[str, Learner]:
        """None besides the policy's."""
        return {}

    def _loss(self, num_pairs: int) -> LossFn:
        def loss(
            batch: TokenBatch, logprobs_BT: torch.Tensor, *, num_tokens: float, num_seqs: float
        ):
            sums_E, lengths_E = _episode_sums(batch, logprobs_BT)
            ref_E = None
            if batch.ref_logprobs_BT is not None:
                ref_E = _episode_sums(batch, batch.ref_logprobs_BT)[0]
            return pair_loss(self.cfg.dpo, sums_E, lengths_E, ref_E, num_pairs)

        return loss


def preference_pairs(
    trajectories: list[Trajectory], per_group: int
) -> tuple[list[tuple[Trajectory, Trajectory]], int]:
    """``(chosen, rejected)`` pairs within each group and the number of groups that gave
    none (all rewards equal): best with worst, then inwards, up to ``per_group``."""
    groups: dict[int, list[Trajectory]] = defaultdict(list)
    for tr in trajectories:
        groups[tr.group_id].append(tr)
    pairs, without = [], 0
    for group in groups.values():
        ranked = sorted(group, key=lambda tr: -tr.reward)
        found = [
            (ranked[k], ranked[-1 - k])
            for k in range(min(per_group, len(ranked) // 2))
            if ranked[k].reward > ranked[-1 - k].reward
        ]
        pairs += found
        without += not found
    return pairs, without


def _episode_sums(
    batch: TokenBatch, logprobs_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed sampled-token log-probs and sampled-token counts per episode of the batch."""
    assert batch.episode_B is not None  # collate sets it
    episodes = batch.episode_B - batch.episode_B.min()
    n = int(episodes.max()) + 1
    sums_B = (logprobs_BT * batch.loss_mask_BT).sum(dim=1)
    lengths_B = batch.loss_mask_BT.sum(dim=1)
    zeros = torch.zeros(n, dtype=sums_B.dtype, device=sums_B.device)
    index = episodes.to(sums_B.device)
    return zeros.index_add(0, index, sums_B), zeros.index_add(0, index, lengths_B)
