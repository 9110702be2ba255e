"""Write the SFT data of ``examples/agent_pipeline.yaml``: expert episodes of each env.

    python examples/make_agent_data.py            # writes data/agent_sft.jsonl (gitignored)
    python examples/make_agent_data.py --episodes 100 --out /tmp/agent_sft.jsonl

Each env's scripted expert (``expert_action``, see ``palaestra/envs/solver.py``) plays
``--episodes`` training-split episodes per unit of the env's ``weight`` in the pipeline
(the function-calling env, weight 2, gets twice as many), exactly as ``palaestra collect
--policy oracle`` does, with the same env kwargs and turn limit as the pipeline's GRPO stage; the successful
ones are written, shuffled together, as one SFT file rendered for the embedded model's chat
template. The function-calling env's episodes are drawn by category with
``FUNCTION_CALL_MIX``, not the env's own mix: more parallel calls and more requests that no
offered function fits (the model's weakest categories after a first SFT), so that declining
to call is something the model has seen often enough to sample. Held-out evaluation uses the
envs' test splits (the env's own mix), which none of these come from.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path

from palaestra import envs
from palaestra.agent.collect import ORACLE, collect, write_records
from palaestra.agent.render import ChatRenderer
from palaestra.agent.rollout import RolloutLimits
from palaestra.config import load_pipeline
from palaestra.models import load_tokenizer

PIPELINE = Path(__file__).parent / "agent_pipeline.yaml"
FUNCTION_CALL = "palaestra/FunctionCall-v0"
FUNCTION_CALL_MIX = {
    "simple": 0.15,
    "multiple": 0.2,
    "parallel": 0.2,
    "parallel_multiple": 0.2,
    "irrelevance": 0.25,
}
"""The share of each category in the function-calling env's expert episodes."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--episodes", type=int, default=200, help="expert episodes per unit of an env's weight"
    )
    parser.add_argument("--out", type=Path, default=Path("data/agent_sft.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grpo = load_pipeline(PIPELINE)[-1]
    renderer = ChatRenderer(load_tokenizer(grpo.model))
    limits = RolloutLimits(max_turns=grpo.rollout.max_turns)
    kept = []
    for env in grpo.train_envs():
        episodes = round(args.episodes * env.weight)
        mix = FUNCTION_CALL_MIX if env.id == FUNCTION_CALL else {None: 1.0}
        for category, share in mix.items():
            kwargs = env.kwargs if category is None else env.kwargs | {"category": category}
            collection = asyncio.run(
                collect(
                    lambda kwargs=kwargs, env=env: envs.make(env.id, **kwargs, split="train"),
                    ORACLE,
                    renderer,
                    env_id=env.id,
                    episodes=round(episodes * share),
                    seed=args.seed,
                    limits=limits,
                )
            )
            print(f"{env.id}{'' if category is None else f' ({category})'}: {collection.summary()}")
            kept += collection.kept
    random.Random(args.seed).shuffle(kept)
    print(f"wrote {write_records(args.out, kept)} SFT records to {args.out}")


if __name__ == "__main__":
    main()
