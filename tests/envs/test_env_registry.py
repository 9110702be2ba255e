"""Every registered env passes check_env, and make() works through both entry points."""

from __future__ import annotations

import importlib.util

import gymnasium as gym
import pytest

import palaestra.envs
from palaestra.envs import MathEnv, TextEnv, UnknownEnvError, check_env, make, registered_ids
from palaestra.envs.bfcl import BFCLEnv, gold_calls

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
    """A reply that answers the opened task correctly: the gold calls for BFCL, else boxed."""
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
