"""The test harness that runs inside the sandbox: hidden tests against an untrusted program.

This file is shipped into the sandbox as ``harness.py`` and run as its first process
(``python -I harness.py``); it is standalone on purpose (standard library only, Python 3.9+)
and is never imported by palaestra. Its spec arrives on stdin as JSON (``nonce``, ``kind``,
``tests`` / ``io_tests``, ``entry_point``, ``setup``, ``solution``, ``test_timeout``), so the
tests and expected outputs never exist as files the program could read or edit.

Before reading the spec the harness makes itself non-dumpable: another process of the same
uid can then neither read its memory nor open its descriptors through ``/proc``. The program
under test runs in a child process and only talks to the harness through two pipes:

- ``function`` tests: the child (this file again, as ``harness.py serve``) loads the
  program, then serves calls of ``entry_point``; it is the program's process, so nothing
  it says is trusted but plain data.
  The harness runs each test snippet (with the trusted ``setup`` code, e.g. the helpers of a
  HumanEval prompt) in its own process, where ``candidate`` is a proxy that sends the
  arguments and decodes the returned value. Values cross as tagged JSON of plain data, so
  comparisons run on the harness's own ``int``/``str``/``list``..., never on an object of
  the program's (an overridden ``__eq__`` cannot pass a test).
- ``io`` tests: the program runs once per test with the test's stdin; its stdout is compared
  (trailing whitespace ignored) with the expected output, which stays in the harness.

So the program cannot exit early with success (its exit status means nothing), skip or
patch the tests (they are not in its process), read the expected values, or write the
result: the harness prints it, prefixed by the run's nonce, on a stdout the program does not
hold. What the harness sees of an attempt is reported in ``signals``: ``exit`` (the program
ended while it should have been serving calls, or raised ``SystemExit``), ``skip`` (it raised
a test framework's skip), ``eq_override`` (it returned an object whose class overrides
``__eq__``), ``patched_builtins`` (it replaced builtins), ``channel`` (it wrote on the call
channel out of turn), ``tampered`` (this script's file was changed or removed).

Output: the line ``<nonce> started`` at once, then ``<nonce> <verdict JSON>`` at the end,
with ``passed`` and ``errors`` (one per test) and ``signals``.
"""

import builtins
import contextlib
import ctypes
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.abspath(__file__)

PLAIN = (type(None), bool, int, float, str)
SKIPS = {"SkipTest", "Skipped", "OutcomeException", "SkipException"}
"""Exception class names of test frameworks' skips (unittest, pytest, nose)."""


class Unsupported(TypeError):
    """A value that cannot cross between the processes as plain data."""


def encode(value, depth=0):
    """Plain data to tagged JSON; anything else raises ``Unsupported``."""
    kind = type(value)
    if depth > 100:
        raise Unsupported("a value nested too deeply")
    if kind in PLAIN:
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    overrides = any("__eq__" in vars(k) for k in kind.__mro__[:-1] if k.__module__ != "builtins")
    raise Unsupported(("eq_override " if overrides else "") + "a " + kind.__name__)


def decode(value):
    """Tagged JSON to plain Python data (the inverse of ``encode``)."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        ((tag, payload),) = value.items()
        if tag == "dict":
            return {decode(k): decode(v) for k, v in payload}
        if tag == "bytes":
            return bytes.fromhex(payload)
        if tag == "complex":
            return complex(*payload)
        kinds = {"tuple": tuple, "set": set, "frozenset": frozenset}
        return kinds[tag](decode(v) for v in payload)
    return value


# ------------------------------------------------- the program's side (untrusted process)


def serve(path, entry_point, requests_fd, responses_fd):
    """Load the program and answer calls of ``entry_point`` (runs in the program's process:
    everything here may be tampered with, so the harness trusts none of it but the data)."""
    requests = os.fdopen(requests_fd, "rb")
    responses = os.fdopen(responses_fd, "wb")

    def send(message):
        responses.write(json.dumps(message).encode() + b"\n")
        responses.flush()

    original = dict(vars(builtins))

    def patched():
        now = vars(builtins)
        return any(now.get(k) is not v for k, v in original.items() if k != "_")

    namespace: dict = {"__name__": "solution", "__builtins__": builtins}
    try:
        with open(path) as source:
            exec(compile(source.read(), path, "exec"), namespace)
        function = namespace[entry_point]
    except BaseException as error:
        send({"loaded": False, "error": describe(error), "patched": patched()})
        return
    send({"loaded": True, "patched": patched()})
    for line in requests:
        try:
            args = [decode(a) for a in json.loads(line)["args"]]
            message = {"value": encode(function(*args))}
        except Unsupported as error:
            message = {"unsupported": str(error)}
        except BaseException as error:
            message = {"raised": describe(error)}
        message["patched"] = patched()
        send(message)


def describe(error):
    """What the harness needs to know of an exception the program raised."""
    names = {k.__name__ for k in type(error).__mro__}
    return {
        "type": type(error).__name__,
        "builtin": type(error).__module__ == "builtins",
        "exit": isinstance(error, SystemExit),
        "skip": bool(names & SKIPS),
        "text": "".join(traceback.format_exception_only(type(error), error))[-2000:],
    }


# ------------------------------------------------------------ the harness's side (trusted)


class SolutionGone(BaseException):
    """The program stopped serving calls; a BaseException so no test's ``except`` eats it."""


class CandidateError(Exception):
    """The program's function raised an exception that is not a builtin one."""


class Solution:
    """The program in its child process, serving calls of its entry point."""

    def __init__(self, path, entry_point, signals):
        self.path, self.entry_point, self.signals = path, entry_point, signals
        self.process = None
        self.load_error = None

    def start(self, deadline):
        requests_r, self.requests = os.pipe()
        self.responses, responses_w = os.pipe()
        argv = [sys.executable, "-I", HERE, "serve", self.path, self.entry_point]
        self.process = subprocess.Popen(
            [*argv, str(requests_r), str(responses_w)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(requests_r, responses_w),
        )
        os.close(requests_r)
        os.close(responses_w)
        self.buffer = b""
        ready = self.receive(deadline)
        if "loaded" not in ready:
            self.signals.add("channel")
        if not ready.get("loaded"):
            self.load_error = ready.get("error", {}).get("text", "the program did not load")
            self.note(ready.get("error"))
            raise SolutionGone(self.load_error)

    def call(self, args, kwargs, deadline):
        if self.load_error is not None:
            raise SolutionGone(self.load_error)
        if self.process is None:
            self.start(deadline)
        if kwargs:
            raise TypeError("keyword arguments are not passed to the program")
        message = json.dumps({"args": [encode(a) for a in args]}).encode() + b"\n"
        try:
            os.write(self.requests, message)
        except BrokenPipeError:
            self.gone()
        response = self.receive(deadline)
        if not {"value", "unsupported", "raised"} & set(response):
            self.signals.add("channel")
            self.stop()
            raise SolutionGone("the program wrote on the call channel")
        if "value" in response:
            return decode(response["value"])
        if "unsupported" in response:
            if response["unsupported"].startswith("eq_override"):
                self.signals.add("eq_override")
            what = response["unsupported"].removeprefix("eq_override ")
            raise TypeError(f"the program returned {what}, which is not plain data")
        error = response["raised"]
        self.note(error)
        if error["exit"] or error["skip"]:
            self.stop()
            raise SolutionGone(error["text"])
        kind = getattr(builtins, error["type"], None) if error["builtin"] else None
        if isinstance(kind, type) and issubclass(kind, Exception):
            raise kind(error["text"])
        raise CandidateError(error["text"])

    def receive(self, deadline):
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.responses], [], [], remaining)[0]:
                self.stop()
                raise SolutionGone("the test timed out")
            chunk = os.read(self.responses, 1 << 16)
            if not chunk:
                self.gone()
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        if self.buffer:  # a well-behaved server never writes ahead
            self.signals.add("channel")
        try:
            message = json.loads(line)
        except ValueError:
            self.signals.add("channel")
            self.stop()
            raise SolutionGone("the program wrote on the call channel") from None
        if not isinstance(message, dict):
            self.signals.add("channel")
            raise SolutionGone("the program wrote on the call channel")
        if message.get("patched"):
            self.signals.add("patched_builtins")
        return message

    def note(self, error):
        if error and error.get("exit"):
            self.signals.add("exit")
        if error and error.get("skip"):
            self.signals.add("skip")

    def gone(self):
        status = self.process.wait() if self.process is not None else -1
        self.stop()
        if status == 0:
            self.signals.add("exit")
        raise SolutionGone(f"the program exited (status {status}) during the test")

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            os.close(self.requests)
            os.close(self.responses)
            self.process = None


def run_function_tests(spec, signals):
    solution = Solution(spec["solution"], spec["entry_point"], signals)
    passed, errors = [], []
    for test in spec["tests"]:
        deadline = time.monotonic() + spec["test_timeout"]

        def candidate(*args, _deadline=deadline, **kwargs):
            return solution.call(args, kwargs, _deadline)

        namespace = {"__name__": "tests", "candidate": candidate}
        try:
            exec(compile(spec["setup"], "setup", "exec"), namespace)
            namespace[spec["entry_point"]] = candidate  # tests may call it by name too
            exec(compile(test, "test", "exec"), namespace)
            passed.append(True)
            errors.append("")
        except BaseException as error:
            passed.append(False)
            errors.append(f"{type(error).__name__}: {error}"[-1000:])
    solution.stop()
    return passed, errors


def run_io_tests(spec):
    passed, errors = [], []
    for stdin, expected in spec["io_tests"]:
        with tempfile.TemporaryFile() as out:
            try:
                subprocess.run(
                    [sys.executable, "-I", spec["solution"]],
                    input=stdin.encode(),
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                    timeout=spec["test_timeout"],
                )
            except subprocess.TimeoutExpired:
                passed.append(False)
                errors.append("the test timed out")
                continue
            out.seek(0)
            got = out.read(len(expected.encode()) + 4096).decode("utf-8", "replace")
        same = normalize(got) == normalize(expected)
        passed.append(same)
        errors.append("" if same else "wrong output")
    return passed, errors


def read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def normalize(text):
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def main():
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    spec = json.loads(sys.stdin.read())
    own_source = read(__file__)
    nonce = spec["nonce"]
    sys.stdout.write(nonce + " started\n")
    sys.stdout.flush()
    signals: set[str] = set()
    if spec["kind"] == "function":
        passed, errors = run_function_tests(spec, signals)
    else:
        passed, errors = run_io_tests(spec)
    if read(__file__) != own_source:
        signals.add("tampered")
    verdict = {"passed": passed, "errors": errors, "signals": sorted(signals)}
    sys.stdout.write(nonce + " " + json.dumps(verdict) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
