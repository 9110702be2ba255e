"""``palaestra collect``: play episodes with an env's scripted expert or a model and write
them as SFT data, rendered exactly as rollouts render them (``agent.collect``). Every flag,
the model and the env with its kwargs are checked before a model loads or an episode is
played: a bad one is one ``error:`` line naming the flag.

What this module does not do: train on the data (a ``stage: sft`` config does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from palaestra.config import GRPOStage


def add_parser(sub: Any) -> None:
    """The ``collect`` subcommand and its flags."""
    co = sub.add_parser(
        "collect", help="play episodes (the env's expert or a model) and write SFT data"
    )
    co.add_argument("--env", required=True, help="registered env id, or module:EnvId")
    co.add_argument("--env-kwargs", default="{}", help="env constructor kwargs as JSON")
    co.add_argument(
        "--policy",
        required=True,
        metavar="oracle|MODEL",
        help="oracle: the env's scripted solver; else a model name or local HF directory",
    )
    co.add_argument("--episodes", type=int, required=True, help="episodes to play")
    co.add_argument(
        "--keep",
        choices=["success", "all"],
        default="success",
        help="which episodes to write (all: every one but infrastructure failures)",
    )
    co.add_argument("--out", type=Path, required=True, help="JSON-lines file of SFT records")
    co.add_argument("--split", default="train", help="task split (default: train)")
    co.add_argument("--seed", type=int, default=0, help="episode i resets with seed + i")
    co.add_argument("--max-turns", type=int, help="default: the env's own turn limit")
    co.add_argument("--temperature", type=float, default=1.0, help="a model's; 0 is greedy")
    co.add_argument("--max-tokens", type=int, default=256, help="a model's tokens per turn")
    co.add_argument("--device", default="cpu", help="where a model runs")
    co.add_argument(
        "--tokenizer",
        default="smollm2-135m",
        help="with --policy oracle: the model whose chat template renders the data",
    )
    co.set_defaults(run=run)


FLAGS = {
    "model": "--policy",
    "device": "--device",
    "seed": "--seed",
    "rollout.max_tokens": "--max-tokens",
    "rollout.max_turns": "--max-turns",
    "eval.temperature": "--temperature",
}
"""The config field each flag sets, so a bad value is named by its flag."""


def run(args: argparse.Namespace) -> int:
    from palaestra import envs
    from palaestra.agent.collect import ORACLE, Collection, Keep, collect, write_records
    from palaestra.agent.engines.base import SamplingParams
    from palaestra.agent.engines.build import close_engine
    from palaestra.agent.render import ChatRenderer
    from palaestra.agent.rollout import RolloutLimits

    oracle = args.policy == ORACLE
    env_kwargs, cfg = _check_flags(args, oracle)
    engine = None
    if oracle:
        from palaestra.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    else:  # a model's engine, built as training and evaluation build theirs
        from palaestra.models import load_model, quiet_libraries, resolve_model
        from palaestra.trainer.stages.common import open_engine

        quiet_libraries()
        model, tokenizer = load_model(resolve_model(args.policy), device=args.device)
        engine = open_engine(cfg, model, tokenizer, share_weights=True)

    limits = None if args.max_turns is None else RolloutLimits(max_turns=args.max_turns)

    async def run() -> Collection:
        try:
            return await collect(
                lambda: envs.make(args.env, **env_kwargs, split=args.split),
                ORACLE if engine is None else engine,
                ChatRenderer(tokenizer),
                env_id=args.env,
                episodes=args.episodes,
                keep=Keep(args.keep),
                seed=args.seed,
                limits=limits,
                sampling=SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature),
            )
        finally:
            if engine is not None:
                await close_engine(engine)

    collection = asyncio.run(run())
    written = write_records(args.out, collection.kept)
    print(f"{args.policy} on {args.env} [{args.split}]: {collection.summary()}")
    print(f"wrote {written} SFT records to {args.out}")
    return 0


def _check_flags(args: argparse.Namespace, oracle: bool) -> tuple[dict[str, Any], GRPOStage]:
    """The env's kwargs and the engine's config from the flags, every flag, the env, the
    model and ``--out`` checked before any model loads or episode is played."""
    from palaestra import preflight
    from palaestra.config import stage_from_flags
    from palaestra.errors import ConfigError

    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--env-kwargs: not valid JSON ({exc}): {args.env_kwargs}") from None
    if not isinstance(env_kwargs, dict):
        raise ConfigError(f"--env-kwargs: must be a JSON object ({{...}}), got {args.env_kwargs}")
    if args.episodes < 1:
        raise ConfigError(f"--episodes: must be >= 1 (got {args.episodes})")
    if args.out.is_dir():
        raise ConfigError(f"--out: {args.out} is a directory; give the JSON-lines file to write")
    rollout = {"max_tokens": args.max_tokens}
    if args.max_turns is not None:
        rollout["max_turns"] = args.max_turns
    flags = {**FLAGS, "model": "--tokenizer" if oracle else "--policy"}
    model = args.tokenizer if oracle else args.policy
    cfg = stage_from_flags(
        {
            "model": model,
            "device": args.device,
            "seed": args.seed,
            "rollout": rollout,
            "eval": {"temperature": args.temperature},
        },
        "palaestra collect",
        flags,
    )
    if not oracle:
        preflight.check_devices([args.device])
    preflight.check_model(model, field=flags["model"])
    preflight.check_env(
        args.env, env_kwargs, args.split, id_field="--env", kwargs_field="--env-kwargs"
    )
    return env_kwargs, cast("GRPOStage", cfg)  # no stage given: a grpo config
