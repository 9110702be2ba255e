"""Errors raised by the top package (config, model resolution and loading).

Every error carries a one-line message a user can act on::

    PalaestraError
    ├── ConfigError              a config key or value is invalid (names the field)
    └── ModelError
        ├── ModelNotFoundError   the name is neither a known model nor a model directory
        └── ModelLoadError       the directory exists but its config or weights are broken
"""

from __future__ import annotations


class PalaestraError(Exception):
    """Base of every error the ``palaestra`` top package raises on purpose."""


class ModelError(PalaestraError):
    """A model could not be found or loaded."""


class ModelNotFoundError(ModelError):
    """The name is not a known embedded model and not a local model directory."""


class ModelLoadError(ModelError):
    """A model directory was found but its config, weights or tokenizer are unusable."""


class ConfigError(PalaestraError):
    """A config file, override or command-line value is invalid; the message names the field."""
