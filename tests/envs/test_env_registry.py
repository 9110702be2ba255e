"""Every registered env passes check_env, make() works through both entry points, and
``module:EnvId`` imports a user's module that registers its env."""

from __future__ import annotations

import importlib.util
import sys

import gymnasium as gym
import pytest

import palaestra.envs
from palaestra.envs import (
    MathEnv,
    SingleTurnEnv,
    TextEnv,
    UnknownEnvError,
    check_env,
    make,
    registered_ids,
    solver_of,
)
from palaestra.envs.bfcl import BFCLEnv, gold_calls
from palaestra.envs.errors import EnvModuleError

NEEDS_PACKAGE = {"palaestra/BFCL-v0": "bfcl_eval"}
"""Envs whose data ships in an optional package: skipped, saying why, when it is missing."""


def _registered_ids() -> list:
    """The built-in ids; tests register their own under ``palaestra-test/``, outside the contract."""
    return [
        pytest.param(
            env_id,
            marks=pytest.mark.skipif(
                importlib.util.find_spec(NEEDS_PACKAGE[env_id]) is None,
                reason=f"{env_id} needs the {NEEDS_PACKAGE[env_id]} package",
            ),
        )
        if env_id in NEEDS_PACKAGE
        else env_id
        for env_id in registered_ids()
        if env_id.startswith("palaestra/")
    ]


def _gold_reply(env: gym.Env, info: dict) -> str:
    """A reply that answers the opened task correctly: the gold calls for BFCL, the expert's
    reply for a single-turn env with a scripted solver, else the boxed answer."""
    solver = solver_of(env)
    if solver is not None and isinstance(env.unwrapped, SingleTurnEnv):
        return solver.expert_action()
    if isinstance(env, BFCLEnv):  # the answer is a set of calls
        item = next(item for item in env.items if item.item_id == info["task_id"])
        return env.format.render(gold_calls(item)) or "No function fits."
    return f"\\boxed{{{info['answer']}}}"


def test_builtin_ids_are_registered() -> None:
    assert {
        "palaestra/Math-v0",
        "palaestra/ChainSum-v0",
        "palaestra/GSMSymbolic-v0",
        "palaestra/ToolLookup-v0",
        "palaestra/BFCL-v0",
    } <= set(registered_ids())


@pytest.mark.parametrize("env_id", _registered_ids())
def test_registered_env_passes_check_env(env_id: str) -> None:
    check_env(make(env_id))


@pytest.mark.parametrize("env_id", _registered_ids())
def test_registered_env_scores_its_own_gold_answer(env_id: str) -> None:
    env = make(env_id, split="test")
    _, info = env.reset(seed=3)

    _, reward, terminated, _, step_info = env.step(_gold_reply(env, info))

    assert reward == 1.0 and terminated
    assert step_info["reward_components"]["correct"] == 1.0
    env.close()


def test_gymnasium_make_returns_the_bare_env() -> None:
    env = gym.make("palaestra/Math-v0")

    assert type(env) is MathEnv  # no checker or order-enforcing wrapper in the way
    messages, info = env.reset(seed=0)
    assert messages[-1]["role"] == "user" and info["task_id"].startswith("basic_arithmetic/")
    env.close()


def test_make_passes_keyword_overrides() -> None:
    env = make("palaestra/ChainSum-v0", split="test", system_prompt=None, size=7)

    messages, info = env.reset(seed=0)

    assert isinstance(env, TextEnv) and env.num_tasks == 7
    assert [m["role"] for m in messages] == ["user"] and info["split"] == "test"
    env.close()


def test_unknown_id_lists_the_registered_ids() -> None:
    with pytest.raises(UnknownEnvError, match="palaestra/Math-v0") as caught:
        make("palaestra/Maths-v0")
    assert caught.value.env_id == "palaestra/Maths-v0"


def test_register_a_custom_env() -> None:
    palaestra.envs.register(
        "palaestra-test/TinySums-v0",
        "palaestra.envs.math:MathEnv",
        source="reasoning_gym:chain_sum",
        size=20,
    )

    env = make("palaestra-test/TinySums-v0")

    assert env.num_tasks == 20 and "palaestra-test/TinySums-v0" in registered_ids()
    env.close()


async def test_astep_on_a_made_env() -> None:
    env = make("palaestra/Math-v0")
    _, info = await env.areset(seed=5)

    _, reward, terminated, truncated, _ = await env.astep(f"\\boxed{{{info['answer']}}}")

    assert (reward, terminated, truncated) == (1.0, True, False)
    env.close()


# ---------------------------------------------------------------- module:EnvId, gymnasium's way

USER_MODULE = """
from palaestra.envs import register
from palaestra.envs.core import TextEnv


class Echo(TextEnv):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Say hi."}], {"task_id": "hi"}

    def step(self, action):
        return [], float(action == "hi"), True, False, {"reward_components": {}}


register("palaestra-test/NAME-v0", f"{__name__}:Echo")
"""


def user_module(tmp_path, monkeypatch, name: str) -> str:
    """A module ``name`` in ``tmp_path``, on ``sys.path``, registering ``palaestra-test/<name>-v0``."""
    (tmp_path / f"{name}.py").write_text(USER_MODULE.replace("NAME", name))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_module_colon_id_imports_the_module_that_registers_the_env(tmp_path, monkeypatch) -> None:
    module = user_module(tmp_path, monkeypatch, "user_envs_a")

    env = make(f"{module}:palaestra-test/user_envs_a-v0")

    assert env.reset(seed=0)[1]["task_id"] == "hi" and env.step("hi")[1] == 1.0
    assert "palaestra-test/user_envs_a-v0" in registered_ids()


def test_a_module_that_cannot_be_imported_is_named_with_the_id() -> None:
    with pytest.raises(EnvModuleError, match="no_such_user_module") as caught:
        make("no_such_user_module:palaestra-test/Nothing-v0")
    assert "palaestra-test/Nothing-v0" in str(caught.value) and "PYTHONPATH" in str(caught.value)
    assert isinstance(caught.value, UnknownEnvError)  # caught where an unknown id is


def test_a_module_that_does_not_register_the_id_is_named_with_the_id(tmp_path, monkeypatch) -> None:
    module = user_module(tmp_path, monkeypatch, "user_envs_b")

    with pytest.raises(EnvModuleError, match="user_envs_b") as caught:
        make(f"{module}:palaestra-test/Other-v0")
    assert "'palaestra-test/Other-v0'" in str(caught.value) and "register(" in str(caught.value)


def test_a_module_that_raises_on_import_is_named(tmp_path, monkeypatch) -> None:
    (tmp_path / "user_envs_broken.py").write_text("raise RuntimeError('no data file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(EnvModuleError, match=r"user_envs_broken.*RuntimeError: no data file"):
        make("user_envs_broken:palaestra-test/Broken-v0")


def test_a_module_in_the_current_directory_is_found_as_python_m_would(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "user_envs_c.py").write_text(USER_MODULE.replace("NAME", "user_envs_c"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)  # the installed `palaestra` command has no cwd on sys.path

    env = make("user_envs_c:palaestra-test/user_envs_c-v0")

    assert env.reset(seed=0)[1]["task_id"] == "hi"
