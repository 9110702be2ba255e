"""Errors raised on the policy side: chat templates, engines and rollouts.

AgentError
├── ChatTemplateError   the chat template cannot prompt the model for training
├── EngineError         an engine failed to generate or to load weights
├── RolloutConfigError  a rollout setting (limits, pool size, staleness) out of range
└── NoSolverError       the oracle was asked to play an env without a scripted solver

A template that rewrites history is not an error: the rollout splits such episodes into
separate training samples (see ``agent.rollout``).
"""


class AgentError(Exception):
    """Base class of palaestra.agent errors."""


class ChatTemplateError(AgentError):
    """The chat template cannot be used for training (none at all, or no generation prompt)."""


class EngineError(AgentError):
    """An engine could not generate or could not load the weights it was given."""


class RolloutConfigError(AgentError, ValueError):
    """A rollout setting outside its allowed values (a limit below 1, a negative staleness)."""


class NoSolverError(AgentError):
    """``collect`` was asked to play the oracle on an env without a scripted solver."""
