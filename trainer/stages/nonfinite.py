"""Skipped steps: count the learner's non-finite steps, and stop after too many in a row.

``Learner.step`` skips a step whose loss or gradient norm is NaN or inf (nothing changes:
weights, optimizer state, schedule) and says so in its metrics: ``nonfinite_step`` is 1,
and PPO's critic reports its own as ``critic/nonfinite_step``. The stage loops hand each
step's metrics to a ``NonFiniteWatch``:

- ``count`` adds the run's total (``train/nonfinite_steps``) to the step's metrics and
  prints a line for a skipped step;
- ``check``, once the step is logged, raises ``NonFiniteStepsError`` after
  ``trainer.max_nonfinite_steps`` skipped steps in a row, naming the likely causes. The
  loop's failure path then saves the weights as ``checkpoints/interrupted``: those of the
  last step that trained, since skipped steps change nothing.

What this module does not do: look at weights, data or rewards itself (the learner checks
the loss and gradients, the rollout refuses non-finite rewards, the checkpoint refuses
non-finite weights).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from palaestra.trainer.errors import NonFiniteStepsError

if TYPE_CHECKING:
    from palaestra.config import TrainerConfig

SKIPPED = "nonfinite_step"
"""The learner's metric: 1 for a skipped step (any prefix: ``critic/nonfinite_step``)."""


class NonFiniteWatch:
    """Counts skipped steps over a run and in a row (see the module docstring)."""

    def __init__(self, trainer: TrainerConfig) -> None:
        self.max_in_a_row = trainer.max_nonfinite_steps
        """Skipped steps in a row that stop the run."""
        self.lr = trainer.lr
        """The configured learning rate, named in the stop message."""
        self.total = 0
        """Steps skipped so far."""
        self.in_a_row = 0
        """Steps skipped since the last step that trained."""

    def count(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Count ``step`` (skipped if any learner of it skipped); print a line if it was.
        Returns the metric to log with the step: ``train/nonfinite_steps``, the total."""
        skipped = any(v > 0 for k, v in metrics.items() if k.split("/")[-1] == SKIPPED)
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += skipped
        if skipped:
            print(
                f"step {step}: skipped, the loss or gradient norm is not finite "
                f"({_figures(metrics)}); {self.in_a_row} in a row, the run stops at "
                f"{self.max_in_a_row} (trainer.max_nonfinite_steps)",
                file=sys.stderr,
            )
        return {"train/nonfinite_steps": float(self.total)}

    def check(self, step: int) -> None:
        """Raise ``NonFiniteStepsError`` if the steps up to ``step`` skipped too many in a row."""
        if self.in_a_row < self.max_in_a_row:
            return
        raise NonFiniteStepsError(
            f"{self.in_a_row} steps in a row (the last: step {step}) had a non-finite loss or "
            "gradient norm and were skipped (trainer.max_nonfinite_steps = "
            f"{self.max_in_a_row}); the weights kept are those of the last step that trained. "
            f"Likely causes: a learning rate too high for this model (trainer.lr = {self.lr:g}: "
            "lower it, or warm up with trainer.warmup_steps); non-finite values the loss reads "
            "(rewards, advantages or reference logprobs: a reward model or custom reward "
            "returning NaN or inf); float16 overflow in a model loaded in float16 (train in "
            "bfloat16 or float32, trainer.dtype)."
        )


def _figures(metrics: dict[str, float]) -> str:
    """The step's loss and gradient norm(s), as logged."""
    shown = [
        f"{name} {value:g}"
        for name, value in metrics.items()
        if name.split("/")[-1] in ("loss", "grad_norm")
    ]
    return ", ".join(shown) or "no loss reported"
