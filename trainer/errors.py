"""Errors raised by the trainer.

TrainerError
├── AllEpisodesFailedError   a step had no episode to train on (every one was an infra failure)
├── DataError                a dataset file is unreadable or a record is malformed (file:line)
├── NonFiniteStepsError      too many steps in a row had a NaN/inf loss or gradient norm
├── NonFiniteWeightsError    a checkpoint save found NaN/inf weights and wrote nothing
└── WeightSyncError          the engine's logprobs disagree with the learner's after a sync
"""


class TrainerError(Exception):
    """Base class of palaestra.trainer errors."""


class AllEpisodesFailedError(TrainerError):
    """Every episode of a step failed for infrastructure reasons; the message has the first error."""


class DataError(TrainerError):
    """A dataset cannot be used: the message names the file, the line and what to fix."""


class NonFiniteStepsError(TrainerError):
    """``trainer.max_nonfinite_steps`` steps in a row were skipped for a non-finite loss or
    gradient norm; the message names the likely causes. The weights are those of the last
    step that trained, since skipped steps change nothing."""


class NonFiniteWeightsError(TrainerError):
    """The weights to save hold NaN or inf; nothing was written. The message names the first
    such tensor."""


class WeightSyncError(TrainerError):
    """The engine scores a probe sequence differently from the learner: the weights it samples
    with are not the ones the learner sent. The message has the max and mean |Δ logprob|."""
