"""Answer extraction and the time-limited math-verify checker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from palaestra.envs import EnvConfigError, MathVerifier, VerifierError, extract_answer
from palaestra.envs.verify import boxed_answers, fast_verdict


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    with MathVerifier(timeout=2.0, workers=2) as shared:
        yield shared


@pytest.mark.parametrize(
    ("text", "fallback", "expected"),
    [
        (r"First \boxed{3}, then \boxed{\frac{1}{2}}.", "none", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", "none", r"\frac{\sqrt{2}}{2}"),
        (r"\boxed{ 42 } and then \boxed{unclosed", "none", "42"),
        (r"\fbox{7}", "none", "7"),
        ("\\boxed{" * 1000 + r"\boxed{5}", "none", "5"),  # a degenerate reply
        ("The answer is 42.", "none", None),
        ("5 + 3 = 8, so 8 it is.", "last_number", "8"),
        ("It costs 1,250.50 dollars", "last_number", "1250.50"),
        ("The result is -3/4", "last_number", "-3/4"),
        ("no digits here", "last_number", None),
    ],
)
def test_extract_answer(text: str, fallback: str, expected: str | None) -> None:
    assert extract_answer(text, fallback) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{12} or maybe \boxed{ 13 }", ["12", "13"]),
        (r"\boxed{\frac{1}{2}} \fbox{7} \boxed{}", [r"\frac{1}{2}", "7", ""]),
        (r"\boxed{\boxed{5}} then \boxed{6", [r"\boxed{5}"]),  # an inner box is part of it
        (r"\boxed{ 4 \boxed{5}", ["5"]),  # the outer box never closes
        ("\\boxed{" * 1000 + r"\boxed{5}", ["5"]),
        ("no box", []),
    ],
)
def test_boxed_answers_are_every_complete_outer_box(text: str, expected: list[str]) -> None:
    assert boxed_answers(text) == expected


@pytest.mark.parametrize(
    ("answers", "agree"),
    [
        (["12", "13"], False),
        (["5", r"\sqrt{4}"], False),
        (["1/2", "0.5", r"\frac{1}{2}"], True),
        ([r"\sqrt{4}", "2"], True),  # settled by math-verify, not the fast path
        (["5", " 5 ", "$5$", "5."], True),
        (["", "5"], True),  # an empty box gives no answer
        (["7"], True),
        ([], True),
    ],
)
def test_answers_agree_when_they_are_one_answer(
    verifier: MathVerifier, answers: list[str], agree: bool
) -> None:
    assert verifier.agree(answers) is agree


def test_extract_answer_rejects_unknown_fallback() -> None:
    with pytest.raises(EnvConfigError, match="'none', 'last_number'"):
        extract_answer("1", fallback="first_number")


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("1/2", "0.5"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac12", "1/2"),
        ("0.50", r"\frac{1}{2}"),
        ("-0.75", r"-\frac{3}{4}"),
        (r"\frac{-3}{4}", "-0.75"),
        ("$-4$", "-4"),
        ("- 4", "-4"),
        ("+7", "7"),
        ("288.0", "288"),
        ("1,000", "1000"),
        (r"2^{1/2}", r"\sqrt{2}"),
        (r"\sqrt{4}", "2"),
        ("x = 3", "3"),
        (r"10\%", "0.1"),
    ],
)
def test_equivalent_forms_are_accepted(verifier: MathVerifier, prediction: str, gold: str) -> None:
    assert verifier.verify(prediction, gold)


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("4", "-4"),
        ("0.51", "1/2"),
        (r"\frac{1}{3}", "0.5"),
        ("", "5"),
        ("five", "5"),
        (r"\sqrt{3}", r"\sqrt{2}"),
        ("x = 4", "3"),
    ],
)
def test_wrong_and_missing_answers_are_rejected(
    verifier: MathVerifier, prediction: str, gold: str
) -> None:
    assert not verifier.verify(prediction, gold)


def test_fast_path_settles_plain_numbers_without_the_worker() -> None:
    assert fast_verdict("0.5", r"\frac{1}{2}") is True
    assert fast_verdict("12", "13") is False
    assert fast_verdict(r"\sqrt{4}", "2") is None  # needs math-verify
    assert fast_verdict("1e999999999", "1") is None  # exponents never reach Fraction()
    assert fast_verdict("2 3", "23") is None  # spaces between digits are not dropped


@pytest.mark.parametrize(
    "pathological",
    [r"9^{9^{9}}", "+".join(f"(x+1)^{{{power}}}" for power in range(1, 300))],
    ids=["power-tower", "giant-expression"],
)
def test_pathological_answer_returns_within_the_limit(pathological: str) -> None:
    with MathVerifier(timeout=1.0) as verifier:
        assert verifier.verify(r"\sqrt{4}", "2")  # the worker is up before the clock starts
        started = time.monotonic()
        verdict = verifier.check(pathological, "5")
        elapsed = time.monotonic() - started

        assert elapsed < 1.0 + 2.0  # the limit plus generous slack for a loaded machine
        assert verdict.timed_out and not verdict.correct
        assert verifier.timeouts == 1
        assert verifier.verify(r"\sqrt{9}", "3")  # a fresh worker took over


def test_concurrent_use_from_threads(verifier: MathVerifier) -> None:
    cases = [
        (r"\sqrt{4}", "2", True),
        (r"\sqrt{5}", "2", False),
        ("x = 3", "3", True),
        ("0.5", "1/2", True),
        (r"2^{10}", "1024", True),
        (r"2^{10}", "1000", False),
    ] * 8

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: verifier.verify(case[0], case[1]), cases))

    assert results == [expected for _, _, expected in cases]


def test_closed_verifier_refuses_and_close_is_idempotent() -> None:
    verifier = MathVerifier()
    assert verifier.verify(r"\sqrt{4}", "2")
    verifier.close()
    verifier.close()

    with pytest.raises(VerifierError, match="closed"):
        verifier.verify("1", "1")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(EnvConfigError, match="timeout"):
        MathVerifier(timeout=0)
    with pytest.raises(EnvConfigError, match="workers"):
        MathVerifier(workers=0)
