"""``MathEnv``: single-turn math questions scored by answer equivalence.

One episode is one question: ``reset`` returns the prompt messages (an optional system
message and the user question), ``step`` takes the model's whole reply, pulls out the
final answer (last ``\\boxed{...}``, else the configured fallback), checks it against the
gold answer with ``MathVerifier`` and ends the episode. The reward is 1 for a correct
answer plus ``format_reward`` when the answer was boxed; ``info["reward_components"]``
holds the two parts.

Hedging: a reply that boxes several answers ("\\boxed{12} or maybe \\boxed{13}") would earn
the reward whenever its last box is right. With ``hedge="zero"`` (the default) a reply whose
boxes disagree scores 0, format reward included, and is named as a reward hack:
``info["reward_hack"] == ["hedge"]``. ``info["reward_components"]["reward_hack"]`` is then
1.0, and 0.0 for a reply that does not hedge (it is never added to the reward), so the
trainer's per-step metrics count hedges. Boxes are compared the way answers are graded:
``\\boxed{1/2}`` and ``\\boxed{0.5}``, or one box repeated, give one answer; an empty box
gives none; two boxes that cannot be compared within ``verify_timeout`` disagree, and so do a
boxed intermediate result and a different final answer. ``hedge="last"`` grades the last box
alone, as before hedges were caught, and reports nothing about the others.

What this env does not do: multi-turn dialogue, tools, partial credit, or judging the
reasoning; only the final answer is scored. Prompts are kept short on purpose (the
default model has 135M parameters).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from enum import Enum
from typing import Any

from palaestra.envs.core import Messages
from palaestra.envs.errors import EnvConfigError
from palaestra.envs.single_turn import SingleTurnEnv, question_messages
from palaestra.envs.step_info import StepInfo
from palaestra.envs.tasks import Split, Task, TaskSource, check_split, parse_source
from palaestra.envs.verify import (
    MathVerifier,
    boxed_answers,
    extract_answer,
    last_boxed,
    parse_fallback,
)

DEFAULT_SYSTEM_PROMPT = "Reason briefly, then give the final answer in \\boxed{}."
"""The default system message."""

DEFAULT_PROMPT_TEMPLATE = "{question}\nPut the final answer in \\boxed{{}}."
"""The default user message; ``{question}`` is replaced by the task's question."""


class Hedge(str, Enum):
    """What ``MathEnv`` does with a reply whose boxed answers disagree."""

    ZERO = "zero"
    """Score it 0 and name it in ``info["reward_hack"]`` as ``"hedge"``."""
    LAST = "last"
    """Grade its last box alone, as if the others were not there."""


class MathEnv(SingleTurnEnv[Task]):
    """Answer a math question; reward 1 when the final answer matches the gold answer."""

    def __init__(
        self,
        source: str | Mapping[str, Any] | TaskSource = "reasoning_gym:basic_arithmetic",
        split: Split = "train",
        seed: int = 0,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        answer_fallback: str = "last_number",
        format_reward: float = 0.0,
        hedge: str = "zero",
        verify_timeout: float = 2.0,
        verifier: MathVerifier | None = None,
        **source_options: Any,
    ) -> None:
        """Args:
        source: a source spec (``"reasoning_gym:chain_sum"``, ``"jsonl:tasks.jsonl"``, or a
            mapping with a ``"source"`` key; see ``parse_source``) or a ``TaskSource``.
        split: ``"train"`` or ``"test"``; must match the split of a ``TaskSource`` passed in.
        seed: the seed the task source derives its splits from (not the episode seed;
            pass that to ``reset``).
        system_prompt: the system message, or None for none.
        prompt_template: the user message; ``{question}`` is replaced by the question.
        answer_fallback: what counts as the answer when the reply has no ``\\boxed{}``:
            ``"last_number"`` or ``"none"``.
        format_reward: added to the reward when the answer is inside ``\\boxed{}``.
        hedge: what a reply whose boxed answers disagree earns: ``"zero"`` (nothing, and
            it is reported as a reward hack) or ``"last"`` (what its last box earns).
        verify_timeout: wall-time limit in seconds for checking one answer.
        verifier: the ``MathVerifier`` to use; the env will not close it. By default all
            MathEnvs with the same ``verify_timeout`` share one (its worker processes are
            stopped when the last of them closes), so a pool of 64 envs does not start
            64 math-verify processes.
        **source_options: passed to the task source (``size``, ``test_size``, ``config``
            for reasoning_gym; ``test_fraction`` for jsonl).
        """
        self.split = check_split(split)
        self.source = self._resolve_source(source, self.split, seed, source_options)
        _check_template(prompt_template)
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.answer_fallback = parse_fallback(answer_fallback)
        self.format_reward = float(format_reward)
        try:
            self.hedge = Hedge(hedge)
        except ValueError:
            allowed = ", ".join(repr(option.value) for option in Hedge)
            raise EnvConfigError(f"hedge must be one of {allowed}, got {hedge!r}.") from None
        self._leases_verifier = verifier is None
        self.verifier = verifier if verifier is not None else _SHARED.acquire(verify_timeout)

    @property
    def num_tasks(self) -> int:
        """How many tasks the split holds."""
        return len(self.source)

    def task_at(self, index: int) -> Task:
        return self.source[index]

    def opening(self, task: Task) -> tuple[Messages, dict[str, Any]]:
        """The system prompt and the templated question; the task's id, answer and split."""
        question = self.prompt_template.format(question=task.question)
        info = StepInfo(task_id=task.task_id, extra={"answer": task.answer, "split": self.split})
        return question_messages(self.system_prompt, question), info.to_info()

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Score the reply ``action`` and end the episode."""
        task = self.take_task()
        boxed = last_boxed(action)
        answer = boxed if boxed is not None else extract_answer(action, self.answer_fallback)
        hedged = self.hedge is Hedge.ZERO and not self.verifier.agree(boxed_answers(action))
        verdict = None if answer is None or hedged else self.verifier.check(answer, task.answer)
        components = {
            "correct": 1.0 if verdict is not None and verdict.correct else 0.0,
            "format": self.format_reward if boxed and not hedged else 0.0,  # not for an empty box
        }
        reward = sum(components.values())
        if self.hedge is Hedge.ZERO:
            components["reward_hack"] = float(hedged)  # counted in metrics, not rewarded
        info = StepInfo(
            task_id=task.task_id,
            reward_components=components,
            reward_hack=("hedge",) if hedged else None,
            extra={
                "answer": task.answer,
                "extracted_answer": answer,
                "verify_timed_out": verdict is not None and verdict.timed_out,
            },
        )
        return [], reward, True, False, info.to_info()

    def close(self) -> None:
        """Give back the shared verifier (an injected one stays open). Idempotent."""
        if self._leases_verifier:
            self._leases_verifier = False
            _SHARED.release(self.verifier)

    @staticmethod
    def _resolve_source(
        source: str | Mapping[str, Any] | TaskSource,
        split: Split,
        seed: int,
        options: dict[str, Any],
    ) -> TaskSource:
        if isinstance(source, (str, Mapping)):
            return parse_source(source, split=split, seed=seed, **options)
        if options:
            raise EnvConfigError(
                f"source options {sorted(options)} only apply to a source spec; this source "
                f"is already built ({source!r}). Pass them to its constructor instead."
            )
        if source.split != split:
            raise EnvConfigError(
                f"the task source serves split {source.split!r} but the env was asked for "
                f"split={split!r}. Pass split={source.split!r}."
            )
        return source


def _check_template(prompt_template: str) -> None:
    """Refuse a template that lacks ``{question}`` or that ``str.format`` cannot fill."""
    try:
        filled = prompt_template.format(question="\x00")
    except (KeyError, IndexError, ValueError) as error:
        raise EnvConfigError(
            f"prompt_template {prompt_template!r} cannot be filled ({error!r}). It is a "
            "str.format template: write literal braces doubled, e.g. '\\boxed{{}}'."
        ) from None
    if "\x00" not in filled:
        raise EnvConfigError(
            f"prompt_template must contain '{{question}}', got {prompt_template!r}."
        )


class _SharedVerifiers:
    """One ``MathVerifier`` per timeout, shared by the envs using it, closed with the last."""

    WORKERS = 2
    """Worker processes per shared verifier; most answers never reach one (fast path)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verifiers: dict[float, MathVerifier] = {}
        self._users: dict[float, int] = {}

    def acquire(self, timeout: float) -> MathVerifier:
        with self._lock:
            if timeout not in self._verifiers:
                self._verifiers[timeout] = MathVerifier(timeout=timeout, workers=self.WORKERS)
                self._users[timeout] = 0
            self._users[timeout] += 1
            return self._verifiers[timeout]

    def release(self, verifier: MathVerifier) -> None:
        with self._lock:
            self._users[verifier.timeout] -= 1
            if self._users[verifier.timeout] == 0:
                del self._verifiers[verifier.timeout], self._users[verifier.timeout]
                verifier.close()


_SHARED = _SharedVerifiers()
