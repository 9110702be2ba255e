"""check_env names the check a broken env fails."""

from __future__ import annotations

from typing import Any

import pytest

from palaestra.envs import EnvCheckError, TextEnv, check_env


class ScriptedEnv(TextEnv):
    """A one-step env whose misbehaviour is set per test."""

    def __init__(self, **breakage: Any) -> None:
        self.breakage = breakage
        self.calls = 0
        self.closed = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.calls += 1
        number = self.calls if self.breakage.get("nondeterministic") else seed
        if self.breakage.get("constant"):
            number = 0
        return [{"role": "user", "content": f"Question {number}"}], {}

    def step(self, action: str):
        reward = self.breakage.get("reward", 1.0)
        terminated = not self.breakage.get("endless", False)
        components = self.breakage.get("components", {"correct": 1.0})
        info = {"reward_components": components, **self.breakage.get("info", {})}
        return [], reward, terminated, False, info

    def close(self) -> None:
        if self.closed and self.breakage.get("close_once"):
            raise RuntimeError("already closed")
        self.closed = True


def test_a_well_behaved_env_passes() -> None:
    check_env(ScriptedEnv())


@pytest.mark.parametrize(
    ("breakage", "check"),
    [
        ({"nondeterministic": True}, "seed determinism"),
        ({"constant": True}, "seed variety"),
        ({"reward": 1}, "step"),
        ({"components": {"correct": "yes"}}, "step"),
        ({"info": {"stop_reason": "gave_up"}}, "step"),
        ({"endless": True}, "termination"),
        ({"close_once": True}, "close"),
    ],
)
def test_broken_env_fails_the_named_check(breakage: dict, check: str) -> None:
    with pytest.raises(EnvCheckError) as caught:
        check_env(ScriptedEnv(**breakage), max_steps=5)
    assert caught.value.check == check


def test_non_env_is_refused() -> None:
    with pytest.raises(EnvCheckError, match="'type'"):
        check_env(object())
