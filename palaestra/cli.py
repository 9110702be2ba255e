"""The ``palaestra`` command: train, evaluate, list environments.

::

    palaestra train CONFIG.yaml [dotted.key=value ...] [--resume RUN_DIR]
    palaestra eval --model smollm2-135m --env palaestra/Math-v0 [--env ID ...] [--out DIR]
    palaestra envs
    palaestra sandbox build-image
    palaestra audit-template smollm2-135m
    palaestra search generate|index|serve ...

User errors (a bad config, an unknown model or env) print one ``error:`` message and exit
with status 2. Nothing is started before the config has been validated and everything
checkable without a model has been checked (``palaestra.preflight``: models, envs and
their kwargs, every dataset of every stage, devices); a run that fails before it writes a
metric or a checkpoint removes the run directory (and the output folders) it made, and a
pipeline stage that fails to start is marked ``failed`` in ``pipeline.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from palaestra import collect_command, eval_command
from palaestra.agent.errors import AgentError
from palaestra.envs.errors import EnvError
from palaestra.errors import PalaestraError
from palaestra.sandboxes.errors import SandboxError
from palaestra.trainer.errors import TrainerError

if TYPE_CHECKING:
    from palaestra.trainer.train_state import TrainingInterrupted

USER_ERRORS = (PalaestraError, EnvError, AgentError, TrainerError, SandboxError)
"""Errors whose message says what to fix: printed as one line, no traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palaestra", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="run a training config")
    train.add_argument("config", type=Path, help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a stopped run from its last training state (a pipeline skips its "
        "finished stages)",
    )
    train.set_defaults(run=_train)

    eval_command.add_parser(sub)

    audit = sub.add_parser(
        "audit-template", help="check a model's chat template for multi-turn use"
    )
    audit.add_argument("model", help="model name or local HF directory")
    audit.set_defaults(run=_audit_template)

    sandbox = sub.add_parser("sandbox", help="sandboxes for code envs")
    sandbox_sub = sandbox.add_subparsers(required=True, metavar="ACTION")
    build = sandbox_sub.add_parser(
        "build-image", help="build the docker sandbox image offline (debootstrap; as root)"
    )
    build.add_argument("--tag", default="palaestra-sandbox:bookworm", help="image name:tag")
    build.add_argument("--suite", default="bookworm", help="Debian release")
    build.add_argument("--mirror", help="Debian mirror (default: this machine's apt source)")
    build.set_defaults(run=_sandbox_build_image)

    search = sub.add_parser("search", help="corpora, indexes and the retrieval server")
    search_sub = search.add_subparsers(required=True, metavar="ACTION")
    generate = search_sub.add_parser(
        "generate", help="write the built-in encyclopedia: corpus.jsonl and questions.jsonl"
    )
    generate.add_argument("--out", type=Path, required=True, help="output directory")
    generate.add_argument("--seed", type=int, default=0, help="which encyclopedia")
    generate.set_defaults(run=_search, action="generate")
    index = search_sub.add_parser("index", help="build a BM25 index of a JSON-lines corpus")
    index.add_argument("corpus", type=Path, help='JSONL, one {"id", "title", "text"} a line')
    index.add_argument("--out", type=Path, required=True, help="index directory")
    index.set_defaults(run=_search, action="index")
    serve = search_sub.add_parser("serve", help="serve an index over HTTP (POST /search)")
    serve.add_argument("--index", type=Path, required=True, help="index directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    serve.add_argument(
        "--timeout-s",
        type=float,
        default=5.0,
        help="drop a client that takes longer to send a request, or idles longer (default 5)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=200,
        help="connections served at once; more are closed on arrival (default 200)",
    )
    serve.set_defaults(run=_search, action="serve")

    collect_command.add_parser(sub)

    ls = sub.add_parser("envs", help="list registered environments")
    ls.set_defaults(run=_envs)
    return parser


def _train(args: argparse.Namespace) -> int:
    from palaestra import preflight
    from palaestra.config import load_pipeline, read_config
    from palaestra.rundir import RunDir

    raw = read_config(args.config, args.overrides)
    stages = load_pipeline(args.config, args.overrides)
    # models, envs, datasets and devices, before a run directory is made or a model loaded
    shared = stages[0].run
    preflight.check_stages(
        stages, run_root=args.resume or (shared.output_dir / shared.name if shared.name else None)
    )
    from palaestra.models import quiet_libraries
    from palaestra.pipeline import reopen_run, run_pipeline, run_stage
    from palaestra.trainer.train_state import TrainingInterrupted

    quiet_libraries()
    made = _missing_dirs(shared.output_dir)  # removed again if the run fails to start
    if "stages" in raw:
        if args.resume is not None:
            root = args.resume
        else:
            shared = stages[0].run
            root = _free_dir(shared.output_dir, shared.name or _run_name(args.config))
        print(f"run directory: {root}", file=sys.stderr)
        try:
            results = run_pipeline(stages, root, raw, resume=args.resume is not None)
        except TrainingInterrupted as stop:
            return _interrupted(stop, args, root)
        except BaseException as exc:
            _clean_failed_pipeline(root, exc, made_here=args.resume is None)
            _remove_empty(made)
            raise
        for i, record in enumerate(results, 1):
            print(f"stage {i} ({record['stage']}): {_summary(record)}")
        print(f"report: {root / 'report.md'}")
        print(f"checkpoint: {results[-1]['checkpoint']}")
        return 0
    (config,) = stages
    if args.resume is not None:
        run = reopen_run(args.resume, config)
    else:
        name = config.run.name or _run_name(args.config)
        run = RunDir.create(config.run.output_dir, name, config.model_dump(mode="json"))
    print(f"run directory: {run.root}", file=sys.stderr)
    try:
        result = run_stage(config, run)
    except TrainingInterrupted as stop:
        run.close()
        return _interrupted(stop, args, run.root)
    except BaseException:
        run.close()
        if args.resume is None:  # a run this call made, failed before it wrote anything
            _remove_if_unused(run.root)
            _remove_empty(made)
        raise
    run.close()
    if result.before is not None and result.after is not None:
        delta = 100 * (result.after.accuracy - result.before.accuracy)
        print(
            f"held-out accuracy: {result.before.accuracy:.3f} -> {result.after.accuracy:.3f} "
            f"({delta:+.1f} points)"
        )
    for key, value in result.metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _interrupted(stop: TrainingInterrupted, args: argparse.Namespace, run_dir: Path) -> int:
    """Say how to resume a run Ctrl-C stopped (its training state is saved): the same
    config and overrides, and the run directory; exit status."""
    print(f"training state saved to {stop.path}", file=sys.stderr)
    command = shlex.join(["palaestra", "train", str(args.config), *args.overrides])
    print(
        f"interrupted at step {stop.step}; resume with: {command} --resume {run_dir}",
        file=sys.stderr,
    )
    return 130


def _unused(run_dir: Path) -> bool:
    """Whether a run directory holds nothing a run produced: no metric, no checkpoint (a
    failed start leaves only the config and empty logs)."""
    metrics = run_dir / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    return not logged and not (run_dir / "checkpoints").exists()


def _remove_if_unused(run_dir: Path) -> None:
    """Remove the run directory of a run that failed before it produced anything."""
    if run_dir.is_dir() and _unused(run_dir):
        shutil.rmtree(run_dir)
        print(f"removed {run_dir}: the run failed before it wrote anything", file=sys.stderr)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    return [p for p in [path, *path.absolute().parents] if not p.exists()]


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the folders of ``dirs`` (deepest first) that are empty, up to the first that
    is not: the output folders a failed start made."""
    for folder in dirs:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run wrote there), or already gone
            return


def _clean_failed_pipeline(root: Path, exc: BaseException, *, made_here: bool) -> None:
    """After a pipeline failed: remove ``root`` if this call made it and no stage produced
    anything; else remove the unused directory of the stage that failed to start and mark
    it ``failed`` in ``pipeline.json`` (not ``running``), with the error."""
    from palaestra.pipeline import STATE_FILE, save_pipeline_state

    state_file = root / STATE_FILE
    if not state_file.is_file():  # no stage started; only the config may have been written
        if made_here and root.is_dir() and {p.name for p in root.iterdir()} <= {"config.yaml"}:
            shutil.rmtree(root)
        return
    state = json.loads(state_file.read_text())
    unused = [e for e in state["stages"] if e["status"] == "running" and _unused(root / e["name"])]
    if made_here and len(unused) == len(state["stages"]):  # nothing finished or trained
        shutil.rmtree(root)
        print(f"removed {root}: the pipeline failed before it wrote anything", file=sys.stderr)
        return
    for entry in unused:
        shutil.rmtree(root / entry["name"], ignore_errors=True)
        entry |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}".rstrip(": ")}
    if unused:
        save_pipeline_state(root, state)


def _run_name(config: Path) -> str:
    return f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _free_dir(parent: Path, name: str) -> Path:
    """``parent/name``, suffixed with a counter if taken."""
    root, n = parent / name, 1
    while root.exists():
        n += 1
        root = parent / f"{name}-{n}"
    return root


def _summary(result: dict) -> str:
    """One line: env accuracy after the stage and its own measures."""
    parts = []
    if result["after"] is not None:
        parts.append(f"held-out accuracy {result['after']['accuracy']:.3f}")
    parts += [f"{k} {v:.3f}" for k, v in result["metrics"].items() if k.endswith("_after")]
    return ", ".join(parts) or "done"


def _audit_template(args: argparse.Namespace) -> int:
    from palaestra.agent.template_audit import audit_template, format_report
    from palaestra.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model))
    print(format_report(args.model, audit_template(tokenizer)))
    return 0


def _sandbox_build_image(args: argparse.Namespace) -> int:
    from palaestra.sandboxes.docker import build_image

    tag = build_image(args.tag, suite=args.suite, mirror=args.mirror)
    print(f"built {tag}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from palaestra.envs.search import BM25Retriever, Encyclopedia, read_corpus, write_corpus

    if args.action == "generate":
        world = Encyclopedia.generate(args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        write_corpus(world.documents, args.out / "corpus.jsonl")
        with (args.out / "questions.jsonl").open("w", encoding="utf-8") as out:
            for q in world.questions:
                out.write(json.dumps({"question": q.question, "answers": [q.answer]}) + "\n")
        print(
            f"wrote {len(world.documents)} documents and {len(world.questions)} questions to {args.out}"
        )
    elif args.action == "index":
        documents = read_corpus(args.corpus)
        BM25Retriever.build(documents).save(args.out)
        print(f"indexed {len(documents)} documents into {args.out}")
    else:
        asyncio.run(_serve_index(args))
    return 0


async def _serve_index(args: argparse.Namespace) -> None:
    from palaestra.envs.search import BM25Retriever
    from palaestra.envs.search.server import serving

    retriever = BM25Retriever.load(args.index)
    async with serving(
        retriever,
        args.host,
        args.port,
        timeout_s=args.timeout_s,
        max_connections=args.max_connections,
    ) as url:
        print(f"serving {len(retriever.documents)} documents on {url}", flush=True)
        await asyncio.Event().wait()


def _envs(args: argparse.Namespace) -> int:
    from palaestra import envs

    for env_id in envs.registered_ids():
        print(env_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
