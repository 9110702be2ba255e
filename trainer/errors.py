"""Errors raised by the trainer.

TrainerError
└── AllEpisodesFailedError   a step had no episode to train on (every one was an infra failure)
"""


class TrainerError(Exception):
    """Base class of palaestra.trainer errors."""


class AllEpisodesFailedError(TrainerError):
    """Every episode of a step failed for infrastructure reasons; the message has the first error."""
