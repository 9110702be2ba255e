"""The errors ``palaestra.sandboxes`` raises, one small hierarchy.

A program that fails, crashes, times out or exceeds a limit is not an error: ``run``
returns an ``ExecResult`` that says so. These exceptions mean the sandbox itself did not do
its job, or was asked to do something it refuses::

    SandboxError
    ├── SandboxConfigError        bad limits or options; the local backend without opt-in
    └── SandboxInfraError         the sandbox failed, so the run says nothing about the program
        ├── SandboxUnavailableError   the backend is missing (no bwrap, no Docker engine/image)
        └── SandboxStartError         the sandbox did not start or its runtime failed mid-run

Code environments let ``SandboxInfraError`` propagate out of ``step``: the rollout then ends
the episode as an infrastructure failure (``env_error``), which is counted and kept out of
the gradient instead of being trained on as a failed program.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every error raised by ``palaestra.sandboxes``."""


class SandboxConfigError(SandboxError, ValueError):
    """Limits or options outside their allowed values, or an unsafe backend not opted into."""


class SandboxInfraError(SandboxError, RuntimeError):
    """The sandbox could not run the program; nothing is known about the program itself."""


class SandboxUnavailableError(SandboxInfraError):
    """The backend cannot be used on this machine (binary, engine or image missing)."""


class SandboxStartError(SandboxInfraError):
    """The sandbox did not start (set-up failed) or its runtime broke during the run."""
