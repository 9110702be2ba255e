"""Errors raised on the policy side: rendering, engines and rollouts.

AgentError
├── TemplateDriftError   the chat template cannot extend an episode token-exactly
└── EngineError          an engine failed to generate or to load weights
"""


class AgentError(Exception):
    """Base class of palaestra.agent errors."""


class TemplateDriftError(AgentError):
    """The chat template re-renders earlier turns, so an episode cannot stay one sequence."""


class EngineError(AgentError):
    """An engine could not generate or could not load the weights it was given."""
