"""Write the datasets of the SFT -> DPO -> GRPO example from the math env's train split.

    python examples/make_math_data.py          # writes examples/data/math_sft.jsonl, math_prefs.jsonl

The prompts are exactly the env's (system prompt included), taken from
``palaestra/Math-v0`` with the task source of ``examples/math_grpo.yaml``, so the answer
format SFT teaches and DPO sharpens is the one GRPO's verifier reads. Held-out evaluation
uses the env's test split, which none of these prompts come from.

- ``math_sft.jsonl``: a prompt and a short worked answer ending in ``\\boxed{N}``.
- ``math_prefs.jsonl``: a prompt, that correct answer (chosen), and a wrong one
  (rejected): off by one or ten, or the other operation, worded the same way.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from palaestra import envs

SOURCE = {
    "source": "reasoning_gym:chain_sum",
    "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
}
OUT = Path(__file__).parent / "data"


def worked(expression: str, value: int) -> str:
    return f"{expression} = {value}.\n\\boxed{{{value}}}"


def wrong_value(expression: str, value: int, rng: random.Random) -> int:
    a, op, b = re.fullmatch(r"\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*", expression).groups()  # type: ignore[union-attr]
    other = int(a) - int(b) if op == "+" else int(a) + int(b)
    choices = [value + 1, value - 1, value + 10, value - 10] + ([other] if other != value else [])
    return rng.choice(choices)


def main(sft_rows: int = 256, pref_rows: int = 256, seed: int = 0) -> None:
    rng = random.Random(seed)
    env = envs.make("palaestra/Math-v0", **SOURCE, split="train")
    OUT.mkdir(exist_ok=True)
    sft, prefs = [], []
    for i in range(sft_rows + pref_rows):
        prompt, info = env.reset(seed=seed * 100_000 + i)
        question = prompt[-1]["content"].splitlines()[0]
        expression = question.split(":", 1)[1].strip().removesuffix("=").strip()
        value = int(info["answer"])
        if i < sft_rows:
            sft.append({"prompt": prompt, "completion": worked(expression, value)})
        else:
            bad = wrong_value(expression, value, rng)
            prefs.append(
                {
                    "prompt": prompt,
                    "chosen": worked(expression, value),
                    "rejected": worked(expression, bad),
                }
            )
    env.close()
    for name, rows in (("math_sft.jsonl", sft), ("math_prefs.jsonl", prefs)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {OUT / name}")


if __name__ == "__main__":
    main()
