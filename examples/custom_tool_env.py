"""A custom tool-use env in under 40 lines: tasks + tools + a verifier.

Defines ``UnitPriceEnv`` (questions about a price list only a tool can read), registers it,
checks it with ``check_env`` and plays one scripted episode, printing the conversation:

    python examples/custom_tool_env.py

Train on it like any registered env, e.g. ``env: {id: example/UnitPrice-v0}`` in a config
(with ``rollout.max_turns`` above 1, so the model gets the tool results back).
"""

from __future__ import annotations

from palaestra.envs import HermesFormat, Task, ToolCall, ToolEnv, check_env, make, register
from palaestra.envs.tasks import stable_hash
from palaestra.envs.verify import AnswerFallback, extract_answer

# --- the env (under 40 lines) -----------------------------------------------------------
FRUITS = ["apple", "banana", "cherry", "damson", "elderberry", "fig", "grape", "kiwi"]


def unit_price(fruit: str) -> int:
    """Price of one fruit, in cents.

    Args:
        fruit: The fruit's name, e.g. "apple".
    """
    return 20 + stable_hash(fruit.strip().lower()) % 80  # made-up prices: ask the tool


def make_tasks(split: str) -> list[Task]:
    """Questions 'How much do N <fruit>s cost?'; one question in five is held out for test."""
    questions = [(fruit, n) for fruit in FRUITS for n in range(2, 12)]
    return [
        Task(
            f"unit_price/{fruit}/{n}",
            f"How many cents do {n} {fruit}s cost?",
            str(n * unit_price(fruit)),
        )
        for fruit, n in questions
        if (stable_hash(f"{fruit}{n}") % 5 == 0) == (split == "test")
    ]


class UnitPriceEnv(ToolEnv):
    """Multiply a looked-up unit price; reward 1 for the exact total."""

    def __init__(self, split: str = "train", **options):
        super().__init__(make_tasks(split), tools=[unit_price], split=split, **options)

    def verify(self, task: Task, answer: str) -> float:
        return float(extract_answer(answer, AnswerFallback.LAST_NUMBER) == task.answer)


# --- use it -----------------------------------------------------------------------------


def main() -> None:
    register("example/UnitPrice-v0", f"{__name__}:UnitPriceEnv")
    check_env(make("example/UnitPrice-v0"))
    print("check_env: passed")

    env = make("example/UnitPrice-v0", split="test")
    messages, info = env.reset(seed=0)
    fruit, count = info["task_id"].split("/")[1:]
    call = HermesFormat().render([ToolCall("unit_price", {"fruit": fruit})], "Let me look it up.")
    observation, *_ = env.step(call)
    price = int(observation[0]["content"])
    answer = f"{count} x {price} = \\boxed{{{int(count) * price}}}"
    _, reward, _, _, step_info = env.step(answer)

    conversation = [*messages, {"role": "assistant", "content": call}, *observation]
    for message in [*conversation, {"role": "assistant", "content": answer}]:
        print(f"[{message['role']}] {message['content']}")
    print(f"reward={reward} success={step_info['success']} tool_calls={step_info['tool_calls']}")
    env.close()


if __name__ == "__main__":
    main()
