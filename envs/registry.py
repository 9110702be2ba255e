"""Versioned ids for palaestra environments: ``register``, ``make``, ``registered_ids``.

This is a thin layer over gymnasium's registry, so ``gymnasium.make("palaestra/Math-v0")``
works as well once ``palaestra.envs`` is imported. palaestra envs are registered without
gymnasium's passive checker and order-enforcing wrappers: ``make`` returns the bare env,
with its ``areset`` / ``astep`` in reach. Contract checks live in ``check_env`` instead.

The built-in ids are registered at the bottom of this module. Register your own env with
``register("myproject/Puzzle-v0", "myproject.envs:PuzzleEnv")`` before calling ``make``, or
let ``make`` import the module that registers it, gymnasium's way: ``make("myproject.envs:
myproject/Puzzle-v0")`` imports ``myproject.envs``, then makes ``myproject/Puzzle-v0``. That
string is all a config's ``env.id`` (or ``palaestra eval --env``) needs, so a run on a user's
own env records how to make it again. The module is looked up on ``sys.path`` and then in the
current directory (as ``python -m`` would), so ``examples.custom_tool_env:example/UnitPrice-v0``
works from the repository root with the installed ``palaestra`` command too.

What this module does not do: wrap envs (time limits, logging); compose them yourself.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import gymnasium as gym

from palaestra.envs.errors import EnvModuleError, UnknownEnvError

_IDS: list[str] = []


def register(env_id: str, entry_point: str, **kwargs: Any) -> None:
    """Register ``entry_point`` (``"module:Class"``) as ``env_id`` with default ``kwargs``.

    Registering the same id again replaces its entry point and defaults.
    """
    gym.register(
        id=env_id,
        entry_point=entry_point,
        disable_env_checker=True,
        order_enforce=False,
        kwargs=kwargs,
    )
    if env_id not in _IDS:
        _IDS.append(env_id)


def registered_ids() -> list[str]:
    """The ids registered through ``register``, in registration order."""
    return list(_IDS)


def make(env_id: str, **kwargs: Any) -> gym.Env:
    """Build the env registered as ``env_id``; ``kwargs`` override its registered defaults.

    ``env_id`` may be ``"module:EnvId"``: ``module`` is imported first (it registers
    ``EnvId`` on import), then ``EnvId`` is made; ``EnvModuleError`` names both when the
    module cannot be imported or does not register that id.
    """
    module, colon, name = env_id.partition(":")
    if colon:
        _import_registering(env_id, module)
        if name not in _IDS:
            raise EnvModuleError(
                env_id,
                module,
                f"was imported, but no env {name!r} is registered (registered ids: "
                f"{', '.join(_IDS)}). Call palaestra.envs.register({name!r}, ...) at the "
                "module's top level, not only under `if __name__ == '__main__'`.",
                registered_ids(),
            )
        env_id = name
    if env_id not in _IDS:
        raise UnknownEnvError(env_id, registered_ids())
    return gym.make(env_id, **kwargs)


def _import_registering(env_id: str, module: str) -> None:
    """Import ``module`` for ``make``, from ``sys.path`` or else the current directory."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        itself = module == missing or module.startswith(f"{missing}.")  # not one of its imports
        if not itself or os.getcwd() in sys.path or "" in sys.path:
            raise EnvModuleError(
                env_id,
                module,
                f"cannot be imported: {exc}. Run from the directory that holds "
                f"{module.split('.')[0]!r}, or add that directory to PYTHONPATH.",
                registered_ids(),
            ) from exc
        sys.path.append(os.getcwd())  # what `python -m` would have put on the path
        _import_registering(env_id, module)
    except Exception as exc:  # the user's module raised on import: say where
        raise EnvModuleError(
            env_id, module, f"raised on import: {type(exc).__name__}: {exc}", registered_ids()
        ) from exc


MATH_ENTRY_POINT = "palaestra.envs.math:MathEnv"

SMALL_ARITHMETIC = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}
"""reasoning_gym config for the arithmetic ids: 2-3 terms of 1-2 digits, a level where a
135M model starts with some successes. It also keeps generation fast: reasoning_gym's
basic_arithmetic finds divisors by trial division, and at its default of up to 6 terms of
4 digits an occasional task takes tens of seconds to generate. The default ``source`` is a
mapping, so passing another ``source`` replaces it whole; ``config=`` alone changes the level."""

register(
    "palaestra/Math-v0",
    MATH_ENTRY_POINT,
    source={"source": "reasoning_gym:basic_arithmetic", "config": SMALL_ARITHMETIC},
)
register(
    "palaestra/ChainSum-v0",
    MATH_ENTRY_POINT,
    source={"source": "reasoning_gym:chain_sum", "config": SMALL_ARITHMETIC},
)
register("palaestra/GSMSymbolic-v0", MATH_ENTRY_POINT, source="reasoning_gym:gsm_symbolic")
register("palaestra/ToolLookup-v0", "palaestra.envs.tool_lookup:ToolLookupEnv")
register("palaestra/FunctionCall-v0", "palaestra.envs.function_call:FunctionCallEnv")
register("palaestra/BFCL-v0", "palaestra.envs.bfcl:BFCLEnv")
register("palaestra/HumanEval-v0", "palaestra.envs.humaneval:HumanEvalEnv")
register("palaestra/HumanEvalTool-v0", "palaestra.envs.humaneval:HumanEvalToolEnv")
register("palaestra/Search-v0", "palaestra.envs.search.env:SearchEnv")
