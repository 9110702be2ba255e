"""palaestra.sandboxes: isolated execution of untrusted code, for code environments.

- ``core``: the ``Sandbox`` protocol, ``Limits`` and ``ExecResult``; ``run_python``.
- ``bubblewrap``: ``BubblewrapSandbox``, Linux namespaces + rlimits (the default; its
  docstring states the threat model: what it stops and what it does not).
- ``docker``: ``DockerSandbox``, a reusable locked-down container (docker SDK), and
  ``build_image``, the offline image build behind ``palaestra sandbox build-image``.
- ``local``: ``LocalSandbox``, no isolation, refused unless explicitly opted into.
- ``pool``: ``SandboxPool`` (a fixed number of sandboxes shared by many callers) and
  ``make_sandbox(backend)``.
- ``process``: spawning and supervising the sandbox process (limits, output caps, reaping).
- ``cgroup``: one memory cgroup per run, so bubblewrap's memory limit holds for the whole
  sandbox where the machine allows it.
- ``errors``: the ``SandboxError`` hierarchy; ``SandboxInfraError`` marks failures of the
  sandbox itself, which code envs report as infrastructure failures.

This is the bottom layer of palaestra: it imports nothing from envs, agent or trainer, and
no torch. It knows nothing about tests or rewards; code environments build on it.
"""

from palaestra.sandboxes.core import ExecResult, Files, Limits, Sandbox, run_python
from palaestra.sandboxes.errors import (
    SandboxConfigError,
    SandboxError,
    SandboxInfraError,
    SandboxStartError,
    SandboxUnavailableError,
)
from palaestra.sandboxes.pool import BACKENDS, SandboxPool, make_sandbox

__all__ = [
    "BACKENDS",
    "ExecResult",
    "Files",
    "Limits",
    "Sandbox",
    "SandboxConfigError",
    "SandboxError",
    "SandboxInfraError",
    "SandboxPool",
    "SandboxStartError",
    "SandboxUnavailableError",
    "make_sandbox",
    "run_python",
]
