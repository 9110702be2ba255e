"""``palaestra eval``: trajectory success rates of a model on one or several envs.

Per env: the success rate over every task (infrastructure failures count as failures and
are shown beside it), unbiased pass@k and pass^k, mean turns and tool calls, the
stop-reason breakdown and success by number of turns; a table on the terminal, and with
``--out`` the same as ``eval.json`` beside ``episodes.jsonl``. The turn limit is each env's
own unless ``--max-turns`` is given; a checkpoint inside a run directory is evaluated on
the env(s) it was trained on unless ``--env`` is given; a task count above the split's size
is capped with a note. Before the model loads, every flag (by the config field it sets),
the model and each env with its kwargs are checked (``palaestra.preflight``): a bad one is
one ``error:`` line naming the flag.

What this module does not do: train, or build engines in its own way (it goes through
``trainer.stages.common.open_engine``, as training does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import gymnasium as gym

    from palaestra.agent.engines.base import Engine
    from palaestra.agent.evaluate import EvalResult
    from palaestra.agent.render import ChatRenderer
    from palaestra.config import GRPOStage


def add_parser(sub: Any) -> None:
    """The ``eval`` subcommand and its flags."""
    ev = sub.add_parser(
        "eval", help="success rate, pass@k and pass^k of a model on envs' held-out splits"
    )
    ev.add_argument(
        "--model",
        default="smollm2-135m",
        help="model name, local HF directory, or a run's checkpoint (runs/NAME/checkpoints/final)",
    )
    ev.add_argument(
        "--env",
        action="append",
        metavar="ID",
        help="registered env id, or MODULE:ID for an env your module registers on import; "
        "repeat for several envs (default: the envs a checkpoint's run trained on, else "
        "palaestra/Math-v0)",
    )
    ev.add_argument(
        "--env-kwargs",
        action="append",
        metavar="JSON",
        help="env constructor kwargs as a JSON object: give it once for every env, or once per "
        "env in the order of --env (merged over the kwargs a checkpoint's run recorded)",
    )
    ev.add_argument("--split", default="test", help="task split to evaluate (default: test)")
    ev.add_argument(
        "--num-tasks", type=int, default=200, help="tasks per env (capped to the split's size)"
    )
    ev.add_argument(
        "--samples", type=int, default=1, help="episodes per task (k of pass@k, pass^k)"
    )
    ev.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ev.add_argument("--max-tokens", type=int, default=128)
    ev.add_argument(
        "--max-turns",
        type=int,
        help="assistant turns per episode (default: the env's own limit; 1 for single-turn envs)",
    )
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the engine's dtype; auto: bfloat16 where the device runs it natively, else float32",
    )
    ev.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm", "openai"],
        help="rollout engine (vllm needs `make setup-vllm`)",
    )
    ev.add_argument("--server-url", help="with --engine openai: the server's root URL")
    ev.add_argument("--server-model", help="with --engine openai: the served model's name")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--sandbox",
        choices=["bubblewrap", "docker"],
        help="code envs (palaestra/HumanEval-v0): the sandbox backend that runs the tests, "
        "given to every --env (for a mix of envs, put it in the code env's --env-kwargs)",
    )
    ev.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write eval.json (settings, results per env) and episodes.jsonl (every episode)",
    )
    ev.add_argument(
        "--json", action="store_true", help="print the results as JSON (env -> result), no table"
    )
    ev.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from palaestra import preflight
    from palaestra.errors import ConfigError

    if args.engine == "openai" and not args.server_url:
        raise ConfigError("--engine openai needs --server-url, the root of a running server")
    cfg = _eval_stage_config(args)
    targets, origin = _eval_targets(args)
    # every flag, the model and each env's kwargs, before the model loads
    preflight.check_devices([args.device])
    preflight.check_model(args.model, field="--model")
    for _, env_id, kwargs in targets:
        preflight.check_env(
            env_id, kwargs, args.split, id_field="--env", kwargs_field="--env-kwargs"
        )
    from palaestra.agent.engines.build import close_engine
    from palaestra.agent.evaluate import results_table
    from palaestra.agent.render import ChatRenderer
    from palaestra.models import load_model, quiet_libraries, resolve_model
    from palaestra.trainer.stages.common import open_engine

    quiet_libraries()
    model, tokenizer = load_model(resolve_model(args.model), device=args.device)
    engine = open_engine(cfg, model, tokenizer, share_weights=True)
    renderer = ChatRenderer(tokenizer)
    ids = ", ".join(env_id for _, env_id, _ in targets)
    print(f"evaluating {args.model} on {ids} ({origin})", file=sys.stderr)  # which, and why

    async def run() -> list[tuple[EvalResult, dict, list[dict]]]:
        try:
            return [await _eval_env(args, cfg, *target, engine, renderer) for target in targets]
        finally:
            await close_engine(engine)

    evaluated = dict(zip([label for label, _, _ in targets], asyncio.run(run()), strict=True))
    records = {label: record for label, (_, record, _) in evaluated.items()}
    if args.out is not None:
        episodes = [e for _, _, played in evaluated.values() for e in played]
        _write_eval(args, origin, records, episodes)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"{args.model} [{args.split} split]")
    print(results_table({label: result for label, (result, _, _) in evaluated.items()}))
    for label, record in records.items():
        for line in _eval_notes(record):
            print(f"  {label}: {line}")
    return 0


def _eval_targets(args: argparse.Namespace) -> tuple[list[tuple[str, str, dict]], str]:
    """``(label, env id, kwargs)`` per env to evaluate, and where they came from: ``--env``,
    else the env(s) the checkpoint's run trained on, else ``palaestra/Math-v0``. A label is
    the env id, numbered where an id is given twice."""
    from palaestra.config_sections import EnvConfig

    recorded: list[dict]
    if args.env:
        ids, recorded, origin = args.env, [{} for _ in args.env], "--env"
    elif (trained := _trained_envs(Path(args.model))) is not None:
        config, listed = trained
        ids, recorded = [e.id for e in listed], [e.kwargs for e in listed]
        origin = f"what its run trained on, as {config} records (--env names others)"
    else:
        ids, recorded = [EnvConfig().id], [{}]
        origin = "the default env (--env names others)"
    given = _env_kwargs(args.env_kwargs, len(ids))
    targets = []
    for i, (env_id, base, extra) in enumerate(zip(ids, recorded, given, strict=True)):
        label = env_id if ids.count(env_id) == 1 else f"{env_id}#{i + 1}"
        kwargs = {**base, **extra} | ({"sandbox": args.sandbox} if args.sandbox else {})
        targets.append((label, env_id, kwargs))
    return targets, origin


def _trained_envs(model: Path) -> tuple[Path, list] | None:
    """The training envs recorded beside a checkpoint (``<run>/checkpoints/<name>`` with
    ``<run>/config.yaml``, a pipeline stage's included), or None for any other model."""
    import yaml
    from pydantic import ValidationError

    from palaestra.config_sections import EnvConfig
    from palaestra.errors import ConfigError

    config = model.parent.parent / "config.yaml"
    if model.parent.name != "checkpoints" or not config.is_file():
        return None
    env = (yaml.safe_load(config.read_text()) or {}).get("env", {})
    listed = env if isinstance(env, list) else [env]
    try:
        return config, [EnvConfig.model_validate(e) for e in listed]
    except ValidationError as exc:
        raise ConfigError(f"{config}: the run's env section is not valid: {exc}") from None


def _env_kwargs(given: list[str] | None, n_envs: int) -> list[dict]:
    """``--env-kwargs``: none, one JSON object for every env, or one per env in order."""
    from palaestra.errors import ConfigError

    given = given or ["{}"]
    if len(given) not in (1, n_envs):
        raise ConfigError(
            f"--env-kwargs was given {len(given)} times for {n_envs} envs: give it once (for "
            "every env) or once per env, in the order of --env"
        )
    parsed = []
    for text in given:
        try:
            kwargs = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--env-kwargs is not valid JSON: {exc}: {text}") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--env-kwargs must be a JSON object ({{...}}), got {text}")
        parsed.append(kwargs)
    return parsed * n_envs if len(parsed) == 1 else parsed


FLAGS = {
    "model": "--model",
    "device": "--device",
    "seed": "--seed",
    "engine": "--engine",
    "engine_dtype": "--dtype",
    "server.url": "--server-url",
    "server.model_name": "--server-model",
    "rollout.max_tokens": "--max-tokens",
    "rollout.max_turns": "--max-turns",
    "eval.num_tasks": "--num-tasks",
    "eval.samples": "--samples",
    "eval.temperature": "--temperature",
}
"""The config field each flag sets: a bad value is refused by the field's own check and
named by its flag."""


def _eval_stage_config(args: argparse.Namespace) -> GRPOStage:
    """The engine, limits and evaluation a training run with these flags would have
    (``open_engine`` builds the engine from it); a bad flag fails naming the flag."""
    from palaestra.config import stage_from_flags

    rollout = {"max_tokens": args.max_tokens}
    if args.max_turns is not None:
        rollout["max_turns"] = args.max_turns
    evaluation = {"num_tasks": args.num_tasks, "samples": args.samples}
    config = stage_from_flags(
        {
            "model": args.model,
            "device": args.device,
            "seed": args.seed,
            "engine": args.engine,
            "engine_dtype": args.dtype,
            "server": {"url": args.server_url, "model_name": args.server_model},
            "rollout": rollout,
            "eval": evaluation | {"temperature": args.temperature},
        },
        "palaestra eval",
        FLAGS,
    )
    return cast("GRPOStage", config)  # no stage given: a grpo config


async def _eval_env(
    args: argparse.Namespace,
    cfg: GRPOStage,
    label: str,
    env_id: str,
    kwargs: dict,
    engine: Engine,
    renderer: ChatRenderer,
) -> tuple[EvalResult, dict, list[dict]]:
    """Evaluate on one env: its result, its JSON record (the result's fields and the env's
    settings) and its episodes' records."""
    import dataclasses

    from palaestra import envs
    from palaestra.agent.engines.base import SamplingParams
    from palaestra.agent.evaluate import env_turn_limit, episode_records, evaluate
    from palaestra.agent.rollout import EnvPool
    from palaestra.trainer.stages.common import rollout_limits

    def make_env() -> gym.Env:
        return envs.make(env_id, **kwargs, split=args.split)

    pool = EnvPool(make_env, min(64, args.num_tasks * args.samples))
    turns, turns_from = _turn_limit(args.max_turns, env_turn_limit(pool.envs[0]))
    print(f"{label}: up to {turns} turn(s) per episode ({turns_from})", file=sys.stderr)
    try:
        result, trajectories = await evaluate(
            pool,
            engine,
            renderer,
            SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature),
            env_id=label,
            num_tasks=args.num_tasks,
            samples=args.samples,
            limits=dataclasses.replace(rollout_limits(cfg), max_turns=turns),
            seed=args.seed,
        )
    finally:
        pool.close()
    # code envs name the reward hacks they caught (each episode scored 0)
    hacks = Counter(h for t in trajectories for h in t.info.get("reward_hack", ()))
    record = dataclasses.asdict(result) | {
        "env_id": env_id,
        "env_kwargs": kwargs,
        "max_turns": turns,
        "max_turns_from": turns_from,
        "reward_hacks": dict(hacks),
    }
    return result, record, episode_records(trajectories, renderer.decode)


def _turn_limit(given: int | None, own: int | None) -> tuple[int, str]:
    """The turns per episode and why: ``--max-turns``, else the env's own limit, else 1."""
    if given is not None:
        return given, "--max-turns"
    if own is not None:
        return own, "the env's own limit"
    return 1, "the env states no limit: pass --max-turns for multi-turn episodes"


def _eval_notes(record: dict) -> list[str]:
    """The lines printed under the table for one env: note, categories, reward hacks."""
    lines = [record["note"]] if record["note"] else []
    lines += [f"{c}: {rate:.3f}" for c, rate in sorted(record["by_category"].items())]
    if record["reward_hacks"]:
        lines.append(f"reward-hack attempts (scored 0): {record['reward_hacks']}")
    return lines


def _write_eval(args: argparse.Namespace, origin: str, records: dict, episodes: list[dict]) -> None:
    """``eval.json`` (the command's settings and each env's record) and ``episodes.jsonl``
    (one line per episode) in ``--out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "run"}
    summary = {"settings": settings, "envs_from": origin, "results": records}
    (args.out / "eval.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with (args.out / "episodes.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(e) + "\n" for e in episodes)
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'episodes.jsonl'}", file=sys.stderr)
