"""The child process behind ``MathVerifier``: runs ``math_verify`` on one answer at a time.

Started by ``verify.py`` through ``runpy.run_path`` (so this folder, whose ``math.py``
would shadow the standard library, stays off ``sys.path``); never imported by palaestra,
so it starts without importing the parent's modules. It speaks JSON lines: it first writes
``{"ready": true}`` once ``math_verify`` is imported, then for each request line
``{"gold": ..., "prediction": ...}`` it writes ``{"correct": bool}`` (plus ``"error"`` when
math_verify raised). It exits when its stdin closes.

It does not time itself out: ``math_verify``'s own timeouts use ``signal.alarm`` and are
switched off here; the parent kills this process when an answer runs past its wall-time
limit. Its address space is capped so that a runaway expression fails with MemoryError
instead of swapping the machine.
"""

import json
import logging
import os
import resource
import sys

MEMORY_LIMIT_BYTES = 2 * 1024**3
"""Address-space cap for this process (2 GiB); math_verify on sane inputs needs ~0.3 GiB."""


def _check(parse, verify, gold: str, prediction: str) -> bool:
    """math_verify's verdict on ``prediction`` against ``gold``, both wrapped as inline LaTeX."""
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    prediction_parsed = parse(f"${prediction}$", parsing_timeout=None)
    if not gold_parsed or not prediction_parsed:
        return False
    return bool(verify(gold_parsed, prediction_parsed, timeout_seconds=None))


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not into the protocol
    sys.stdout = sys.stderr
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
    from math_verify import parse, verify

    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        reply: dict[str, object]
        try:
            reply = {"correct": _check(parse, verify, request["gold"], request["prediction"])}
        except Exception as error:  # MemoryError and RecursionError included
            reply = {"correct": False, "error": f"{type(error).__name__}: {error}"[:500]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
