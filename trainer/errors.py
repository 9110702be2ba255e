"""Errors raised by the trainer.

TrainerError
├── AllEpisodesFailedError   a step had no episode to train on (every one was an infra failure)
└── WeightSyncError          the engine's logprobs disagree with the learner's after a sync
"""


class TrainerError(Exception):
    """Base class of palaestra.trainer errors."""


class AllEpisodesFailedError(TrainerError):
    """Every episode of a step failed for infrastructure reasons; the message has the first error."""


class WeightSyncError(TrainerError):
    """The engine scores a probe sequence differently from the learner: the weights it samples
    with are not the ones the learner sent. The message has the max and mean |Δ logprob|."""
