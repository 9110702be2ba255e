"""Math answer checking: pull the final answer out of a reply, and judge it against gold.

- ``extract_answer(text, fallback)`` returns the content of the last ``\\boxed{...}``
  (nested braces handled) or, when there is none, what the fallback finds (the last
  number in the text, or nothing). ``boxed_answers(text)`` returns every boxed answer.
- ``MathVerifier.verify(prediction, gold)`` decides equivalence with ``math-verify``
  (fractions, decimals, LaTeX, signs, ``$...$``), under a per-answer wall-time limit;
  ``MathVerifier.agree(answers)`` says whether several answers are one (a reply that boxes
  ``12`` and ``13`` hedges; one that boxes ``1/2`` and ``0.5`` does not).

Why a worker process: math-verify hands answers to sympy, and some answers (``9^{9^{9}}``,
a page of nested powers) take minutes or forever. math-verify's own timeouts use
``signal.alarm``, which only works on the main thread, and rollouts score from worker
threads. So math-verify runs in a persistent child process (``_verify_worker.py``,
started with ``subprocess``, so no ``__main__`` guard is needed in user scripts); when an
answer runs past the limit the child is killed and restarted and the answer counts as
wrong. Most answers never reach the child: equal strings, and plain numbers or fractions
(``-4``, ``0.5``, ``1/2``, ``\\frac{1}{2}``), are settled in-process.

What this module does not do: grade proofs or free-form text, or check units. It needs a
POSIX system (it waits on pipes with ``select``).
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

from palaestra.envs.errors import EnvConfigError, VerifierError

# ---------------------------------------------------------------------------- extraction


class AnswerFallback(str, Enum):
    """What ``extract_answer`` returns when the text has no ``\\boxed{...}``."""

    NONE = "none"
    """Nothing: an unboxed answer counts as missing."""
    LAST_NUMBER = "last_number"
    """The last number in the text (``1,000`` read as ``1000``; ``3/4`` kept whole)."""


_BOX_COMMANDS = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER_IN_TEXT = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), else None.

    Linear in the length of the text, however many unclosed boxes a degenerate reply holds.
    """
    boxes = _complete_boxes(text)
    if not boxes:
        return None
    brace, close = boxes[-1]
    return text[brace + 1 : close].strip()


def boxed_answers(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{...}`` (or ``\\fbox{...}``), in order; a box
    inside another is part of that one's answer. Linear in the length of the text.

    >>> boxed_answers(r"\\boxed{12} or maybe \\boxed{13}, or \\boxed{")
    ['12', '13']
    """
    answers: list[str] = []
    end_of_last = -1
    for brace, close in _complete_boxes(text):
        if brace > end_of_last:
            end_of_last = close
            answers.append(text[brace + 1 : close].strip())
    return answers


def _complete_boxes(text: str) -> list[tuple[int, int]]:
    """``(opening brace, closing brace)`` of every box command whose brace gets closed, in
    the order the boxes open (a box inside another comes after it)."""
    box_braces = [match.end() - 1 for match in _BOX_COMMANDS.finditer(text)]
    if not box_braces:
        return []
    closing = _matching_braces(text)
    return [(brace, closing[brace]) for brace in box_braces if brace in closing]


def _matching_braces(text: str) -> dict[int, int]:
    """Map the position of each ``{`` that gets closed to the position of its ``}``."""
    open_braces: list[int] = []
    pairs: dict[int, int] = {}
    for position, character in enumerate(text):
        if character == "{":
            open_braces.append(position)
        elif character == "}" and open_braces:
            pairs[open_braces.pop()] = position
    return pairs


def extract_answer(
    text: str, fallback: AnswerFallback | str = AnswerFallback.LAST_NUMBER
) -> str | None:
    """The final answer in a model reply: the last ``\\boxed{...}``, else the fallback's pick.

    >>> extract_answer(r"so it is \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("5 + 3 makes 8.", fallback="last_number")
    '8'
    >>> extract_answer("5 + 3 makes 8.", fallback="none") is None
    True
    """
    fallback = parse_fallback(fallback)
    boxed = last_boxed(text)
    if boxed is not None or fallback is AnswerFallback.NONE:
        return boxed
    numbers = _NUMBER_IN_TEXT.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def parse_fallback(fallback: AnswerFallback | str) -> AnswerFallback:
    """``fallback`` as an ``AnswerFallback``; a bad name raises ``EnvConfigError``."""
    try:
        return AnswerFallback(fallback)
    except ValueError:
        allowed = ", ".join(repr(option.value) for option in AnswerFallback)
        raise EnvConfigError(
            f"answer fallback must be one of {allowed}, got {fallback!r}."
        ) from None


# ----------------------------------------------------------------------------- fast path

_FAST_PATH_MAX_CHARS = 64  # longer strings go to the worker; keeps Fraction() cheap
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_PLAIN_FRACTION = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{(\d+)\}")
_INTEGER = re.compile(r"[+-]?\d+")


def normalize_answer(text: str) -> str:
    """Answer text without ``$``, LaTeX thin spaces, a final period, or whitespace (except
    one space between two word characters, so ``2 3`` does not become ``23``)."""
    text = re.sub(r"\$|\\[,!;]", "", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".")
    text = re.sub(r" (?!\w)|(?<!\w) ", "", text)
    return re.sub(r"\\[dt]frac", r"\\frac", text)


def as_number(text: str) -> Fraction | None:
    """A normalized answer as an exact number, if it is a plain number or fraction."""
    if len(text) > _FAST_PATH_MAX_CHARS:
        return None
    if _PLAIN_NUMBER.fullmatch(text):
        return Fraction(text)
    match = _PLAIN_FRACTION.fullmatch(text) or _LATEX_FRACTION.fullmatch(text)
    if match is None:
        return None
    *sign, numerator, denominator = match.groups()
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return -value if sign == ["-"] else value


def fast_verdict(prediction: str, gold: str) -> bool | None:
    """Settle easy cases in-process: True/False when certain, None to ask math-verify."""
    prediction, gold = normalize_answer(prediction), normalize_answer(gold)
    if not prediction:
        return False
    if prediction == gold:
        return True
    prediction_value, gold_value = as_number(prediction), as_number(gold)
    if prediction_value is None or gold_value is None:
        return None
    if prediction_value == gold_value:
        return True
    if _INTEGER.fullmatch(prediction) and _INTEGER.fullmatch(gold):
        return False  # distinct integers: no rounding rule can make them equal
    return None


# -------------------------------------------------------------------------- worker side

_WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")
# Run the script through runpy, not as `python script.py`: that would put this folder on
# sys.path, where our math.py shadows the standard library's math module.
_WORKER_BOOTSTRAP = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take a while


class _WorkerTimeout(Exception):
    """The worker ran past the answer's wall-time limit (it has been killed)."""


class _WorkerCrash(Exception):
    """The worker exited mid-answer (e.g. it hit its memory cap)."""


class _Worker:
    """One math-verify child process, used by one thread at a time."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._buffer = b""
        self._ready = False
        self._closed = False

    def ask(self, gold: str, prediction: str, timeout_s: float) -> bool:
        """math-verify's verdict, or ``_WorkerTimeout`` / ``_WorkerCrash``."""
        if self._closed:
            raise VerifierError("this MathVerifier is closed; create a new one to check answers.")
        self._ensure_ready()
        request = json.dumps({"gold": gold, "prediction": prediction}) + "\n"
        try:
            process = self._checked_process()
            assert process.stdin is not None  # set by Popen(stdin=PIPE)
            process.stdin.write(request.encode("utf-8"))
            process.stdin.flush()
            return bool(self._read_reply(timeout_s)["correct"])
        except (_WorkerTimeout, _WorkerCrash, BrokenPipeError):
            self.restart()
            raise

    def _ensure_ready(self) -> None:
        """Start the child if needed and wait (outside any answer's limit) until it is ready."""
        if self._process is not None and self._process.poll() is not None:
            self._stop()  # it died between answers (killed from outside): start afresh
        if self._process is None:
            self._spawn()
        if not self._ready:
            self._read_reply(_STARTUP_TIMEOUT_S, starting=True)
            self._ready = True

    def restart(self) -> None:
        """Kill the child and start a fresh one (it imports while the caller moves on)."""
        self._stop()
        if not self._closed:
            self._spawn()

    def close(self) -> None:
        """Stop the child for good. Idempotent."""
        self._closed = True
        self._stop()

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout, self._stderr):
                if stream is not None:
                    stream.close()
        self._process, self._stderr, self._buffer, self._ready = None, None, b"", False

    def _spawn(self) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOTSTRAP, str(_WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            close_fds=True,
        )

    def _checked_process(self) -> subprocess.Popen[bytes]:
        if self._closed or self._process is None:
            raise VerifierError("the MathVerifier was closed while an answer was being checked.")
        return self._process

    def _read_reply(self, timeout_s: float, starting: bool = False) -> dict[str, Any]:
        process = self._checked_process()
        assert process.stdout is not None  # set by Popen(stdout=PIPE)
        descriptor = process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([descriptor], [], [], max(remaining, 0.0))
            if not readable:
                if starting:
                    self._fail_start(f"it did not report ready within {timeout_s:.0f} s")
                raise _WorkerTimeout
            chunk = os.read(descriptor, 65536)
            if not chunk:
                if starting:
                    self._fail_start("it exited during start-up")
                raise _WorkerCrash
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _fail_start(self, reason: str) -> None:
        stderr = b""
        if self._stderr is not None:
            self._stderr.seek(0)
            stderr = self._stderr.read()[-2000:]
        self._stop()
        raise VerifierError(
            f"the math-verify worker ({_WORKER_SCRIPT}) failed to start: {reason}. Its stderr "
            f"ended with: {stderr.decode(errors='replace') or '(nothing)'}. Check that "
            f"`{sys.executable} -c 'import math_verify'` works."
        )


# ---------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one answer."""

    correct: bool
    """Whether the prediction is equivalent to the gold answer."""
    timed_out: bool = False
    """True when math-verify ran past the limit; ``correct`` is then False."""


class MathVerifier:
    """Judges math answers with math-verify under a per-answer wall-time limit.

    Safe to call from many threads: each call borrows one of ``workers`` child processes
    (started on first need) and waits for a free one if all are busy; the wait does not
    count towards the limit. Close it (or use it as a context manager) to stop the
    children; any left open are stopped when it is garbage-collected or at interpreter
    exit.
    """

    def __init__(self, timeout: float = 2.0, workers: int = 1) -> None:
        """Args:
        timeout: wall-time limit in seconds for math-verify on one answer.
        workers: how many child processes may check answers at the same time.
        """
        if timeout <= 0:
            raise EnvConfigError(f"verify timeout must be positive seconds, got {timeout}.")
        if workers < 1:
            raise EnvConfigError(f"workers must be at least 1, got {workers}.")
        self.timeout = timeout
        self._workers = [_Worker() for _ in range(workers)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._workers:
            self._idle.put(worker)
        self._counts_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_workers, self._workers)

    @property
    def timeouts(self) -> int:
        """How many answers ran past the limit so far."""
        return self._counts["timeouts"]

    @property
    def crashes(self) -> int:
        """How many answers made the worker exit (e.g. by exhausting its memory cap)."""
        return self._counts["crashes"]

    def verify(self, prediction: str, gold: str) -> bool:
        """Whether ``prediction`` is equivalent to ``gold``; False on timeout."""
        return self.check(prediction, gold).correct

    def check(self, prediction: str, gold: str) -> Verdict:
        """Like ``verify``, but also says whether the answer timed out."""
        if self._closed:
            raise VerifierError("this MathVerifier is closed; create a new one to check answers.")
        settled = fast_verdict(prediction, gold)
        if settled is not None:
            return Verdict(correct=settled)
        worker = self._idle.get()
        try:
            return Verdict(correct=worker.ask(gold, prediction, self.timeout))
        except _WorkerTimeout:
            self._count("timeouts")
            return Verdict(correct=False, timed_out=True)
        except (_WorkerCrash, BrokenPipeError):
            self._count("crashes")
            return Verdict(correct=False)
        finally:
            self._idle.put(worker)

    def agree(self, answers: Sequence[str]) -> bool:
        """Whether ``answers`` all give one answer: each is checked against the last as
        ``check`` checks a prediction against gold, so ``1/2`` and ``0.5`` agree.

        Empty answers are skipped and repeats (equal after ``normalize_answer``) checked
        once; the checks stop at the first answer that differs. An answer that runs past the
        limit counts as different.
        """
        distinct: dict[str, str] = {}
        for answer in reversed(answers):
            distinct.setdefault(normalize_answer(answer), answer)
        distinct.pop("", None)
        if len(distinct) < 2:
            return True
        reference, *others = distinct.values()
        return all(self.check(answer, reference).correct for answer in others)

    def close(self) -> None:
        """Stop the worker processes. Idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _count(self, event: str) -> None:
        with self._counts_lock:
            self._counts[event] += 1


def _close_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.close()
