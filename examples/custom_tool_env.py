"""A custom tool-use env in under 40 lines (tasks + tools + a verifier), plus a 6-line expert.

Defines ``UnitPriceEnv`` (questions about a price list only a tool can read), registers it,
checks it with ``check_env`` and plays one episode with its expert, printing the conversation:

    python examples/custom_tool_env.py

Importing this module registers ``example/UnitPrice-v0``, so ``palaestra`` can train and
evaluate on it with no wrapper script, naming the module before the id (gymnasium's
``module:EnvId``), from the repository root::

    palaestra eval --model tiny-random --env examples.custom_tool_env:example/UnitPrice-v0

and ``env: {id: "examples.custom_tool_env:example/UnitPrice-v0"}`` in a training config
(with ``rollout.max_turns`` above 1, so the model gets the tool results back); the run's
``config.yaml`` records that id, so the run can be repeated as it is.

The env also says how an expert solves a task (``expert_action``, optional; see
``envs/solver.py``), so ``palaestra collect`` writes SFT data from the env itself, rendered
exactly as rollouts render it, to warm-start a model before RL::

    palaestra collect --env examples.custom_tool_env:example/UnitPrice-v0 --policy oracle \
        --episodes 200 --out unit_price_sft.jsonl
"""

from __future__ import annotations

from palaestra.envs import Task, ToolCall, ToolEnv, check_env, make, register
from palaestra.envs.tasks import stable_hash
from palaestra.envs.verify import AnswerFallback, extract_answer

# --- the env (under 40 lines, plus the optional 6-line expert) ---------------------------
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
            metadata={"fruit": fruit, "count": n},
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

    def expert_action(self) -> str:  # optional: the expert's next message, for collect
        fruit, count = self.task.metadata["fruit"], self.task.metadata["count"]
        if self.stats.turn == 0:  # call the tool, written in the env's own tool-call format
            return self.format.render([ToolCall("unit_price", {"fruit": fruit})])
        price = unit_price(fruit)  # what the tool result said
        return f"{count} x {price} = \\boxed{{{count * price}}}"


register("example/UnitPrice-v0", f"{__name__}:UnitPriceEnv")  # on import: module:EnvId works

# --- use it -----------------------------------------------------------------------------


def main() -> None:
    check_env(make("example/UnitPrice-v0"))
    print("check_env: passed")

    env = make("example/UnitPrice-v0", split="test")
    conversation, _ = env.reset(seed=0)
    done = False
    while not done:
        action = env.unwrapped.expert_action()
        observation, reward, terminated, truncated, step_info = env.step(action)
        conversation += [{"role": "assistant", "content": action}, *observation]
        done = terminated or truncated
    for message in conversation:
        print(f"[{message['role']}] {message['content']}")
    print(f"reward={reward} success={step_info['success']} tool_calls={step_info['tool_calls']}")
    env.close()


if __name__ == "__main__":
    main()
