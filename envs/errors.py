"""The errors ``palaestra.envs`` raises, one small hierarchy.

Every message is a sentence a user can act on: what went wrong, where, and how to fix it.
Catch ``EnvError`` to catch them all::

    EnvError
    ├── UnknownEnvError       make() got an id nobody registered
    │   └── EnvModuleError        a module:EnvId whose module fails or does not register it
    ├── EnvConfigError        a constructor argument has a bad value
    ├── TaskSourceError       a task source spec or data file is malformed
    ├── ResetNeededError      step() before reset() or after the episode ended
    ├── EnvCheckError         check_env() found a broken contract (names the check)
    ├── StepInfoError         an info dict breaks the StepInfo contract (names env and key)
    ├── VerifierError         the answer-checking worker process could not run
    ├── ToolDefinitionError   a Python function cannot become a tool (untyped parameter, ...)
    ├── ToolInfraError        a tool's own infrastructure failed (ends the episode: tool_error)
    └── ToolCallError         one tool call failed; its message is written for the model
        ├── ToolArgumentError     the arguments do not match the tool's schema
        ├── ToolTimeoutError      the call ran past the tool's time limit
        └── ToolExecutionError    the tool's function raised

``ToolCallError`` is not a crash: tool envs turn it into an observation the model reads
(and count it in ``info["tool_errors"]``); it reaches user code only from ``Tool.call``.

``ResetNeededError`` also subclasses gymnasium's ``ResetNeeded`` so code written against
gymnasium's error catches it too.

This module does not define errors for the policy or trainer side; those live in their
own packages.
"""

from __future__ import annotations

import gymnasium as gym


class EnvError(Exception):
    """Base class of every error raised by ``palaestra.envs``."""


class UnknownEnvError(EnvError, LookupError):
    """An environment id that is not registered."""

    def __init__(self, env_id: str, known_ids: list[str]) -> None:
        known = ", ".join(known_ids) or "(none)"
        super().__init__(
            f"No palaestra environment is registered as {env_id!r}. Registered ids: {known}. "
            "Check the spelling and the version suffix (e.g. '-v0'), and make sure the module "
            "that registers a custom env is imported before make()."
        )
        self.env_id = env_id
        self.known_ids = known_ids


class EnvModuleError(UnknownEnvError):
    """A ``module:EnvId`` whose module cannot be imported, or does not register ``EnvId``."""

    def __init__(self, env_id: str, module: str, problem: str, known_ids: list[str]) -> None:
        EnvError.__init__(self, f"{env_id!r}: module {module!r} {problem}")
        self.env_id = env_id
        self.module = module
        self.known_ids = known_ids


class EnvConfigError(EnvError, ValueError):
    """A constructor argument outside its allowed values."""


class TaskSourceError(EnvError, ValueError):
    """A task source spec that cannot be resolved, or a data file with a bad record."""


class ResetNeededError(EnvError, gym.error.ResetNeeded):
    """``step`` was called before ``reset`` or after the episode already ended."""


class EnvCheckError(EnvError):
    """``check_env`` found an environment that breaks the env contract."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"check_env failed the {check!r} check: {detail}")
        self.check = check
        self.detail = detail


class StepInfoError(EnvError, TypeError):
    """An env's ``info`` dict holds a key ``StepInfo`` reads with a value of the wrong type."""


class VerifierError(EnvError, RuntimeError):
    """The answer-verification worker process could not be started or talked to."""


class ToolDefinitionError(EnvError, TypeError):
    """A function that cannot be described to a model as a tool."""


class ToolCallError(EnvError):
    """A tool call that failed; ``str(error)`` is the text the model is shown."""


class ToolArgumentError(ToolCallError, ValueError):
    """Tool arguments that do not match the tool's JSON schema (every problem listed)."""


class ToolTimeoutError(ToolCallError, TimeoutError):
    """A tool call that did not finish within the tool's time limit."""


class ToolExecutionError(ToolCallError):
    """The tool's function raised; the original exception is the ``__cause__``."""


class ToolInfraError(EnvError):
    """Raised by a tool's function when the tool's infrastructure failed (not the model's
    input): the call is not shown to the model and the episode ends as a ``tool_error``,
    an infrastructure failure kept out of the gradient."""
