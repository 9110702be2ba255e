"""palaestra.envs: Gymnasium text environments for language-model agents.

Importing this package registers the built-in env ids with gymnasium, so both
``palaestra.envs.make("palaestra/Math-v0")`` and ``gymnasium.make("palaestra/Math-v0")``
work. The pieces:

- ``core``: the ``TextEnv`` contract (messages in, assistant text out).
- ``registry``: ``register`` / ``make`` / ``registered_ids``.
- ``checker``: ``check_env``, the contract checks every env must pass.
- ``tasks``: task sources (reasoning_gym generators, JSON-lines files) with disjoint splits.
- ``verify``: answer extraction and time-limited math answer checking.
- ``math``: ``MathEnv``, single-turn math questions.
- ``errors``: the ``EnvError`` hierarchy.

This package imports no torch and never sees token ids.
"""

from palaestra.envs.checker import check_env
from palaestra.envs.core import Message, Messages, MessagesSpace, TextEnv, TextSpace
from palaestra.envs.errors import (
    EnvCheckError,
    EnvConfigError,
    EnvError,
    ResetNeededError,
    TaskSourceError,
    UnknownEnvError,
    VerifierError,
)
from palaestra.envs.math import MathEnv
from palaestra.envs.registry import make, register, registered_ids
from palaestra.envs.tasks import JsonlSource, ReasoningGymSource, Task, TaskSource, parse_source
from palaestra.envs.verify import AnswerFallback, MathVerifier, Verdict, extract_answer

__all__ = [
    "AnswerFallback",
    "EnvCheckError",
    "EnvConfigError",
    "EnvError",
    "JsonlSource",
    "MathEnv",
    "MathVerifier",
    "Message",
    "Messages",
    "MessagesSpace",
    "ReasoningGymSource",
    "ResetNeededError",
    "Task",
    "TaskSource",
    "TaskSourceError",
    "TextEnv",
    "TextSpace",
    "UnknownEnvError",
    "Verdict",
    "VerifierError",
    "check_env",
    "extract_answer",
    "make",
    "parse_source",
    "register",
    "registered_ids",
]
