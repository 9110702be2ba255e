"""The GRPO benchmark on a CUDA GPU: whole-step throughput, learner MFU, peak GPU memory.

Needs torch and transformers only (no vLLM: the transformers engine samples). Two parts:

- the main job's GRPO steps with ``device=cuda`` (``examples/math_grpo.yaml``): completed
  tokens per second over whole steps, and the phase split;
- the learner alone: AdamW steps on full batches of ``rows x length`` tokens, timed with
  CUDA events; model FLOPs utilisation = ``6 * parameters * tokens / time`` over the GPU's
  dense bf16 peak (H100 SXM 989 TFLOP/s, H200 989, A100 312).

    python -m bench.gpu_grpo --model smollm2-135m --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
CONFIG = Path(__file__).resolve().parent.parent / "examples" / "math_grpo.yaml"


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def learner_mfu(
    model_name: str, rows: int = 16, length: int = 512, steps: int = 5
) -> dict[str, Any]:
    from palaestra.models import Precision, load_model, resolve_model
    from palaestra.trainer.batch import TokenBatch
    from palaestra.trainer.learner import Learner, OptimSettings, policy_forward
    from palaestra.trainer.losses import sft_loss

    model, _ = load_model(resolve_model(model_name), device="cuda")
    learner = Learner(
        model,
        OptimSettings(lr=1e-5, micro_batch_size=rows),
        forward=policy_forward(1.0),
        precision=Precision.resolve("cuda", learner="bfloat16"),
    )
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    mask = torch.ones(rows, length)
    mask[:, 0] = 0
    batch = TokenBatch(ids, torch.ones_like(ids), mask)

    def loss(b, logprobs_BT, *, num_tokens, num_seqs):  # type: ignore[no-untyped-def]
        return sft_loss(logprobs_BT, b.loss_mask_BT, num_tokens=num_tokens)

    learner.step(batch, loss)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        learner.step(batch, loss)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    params = sum(p.numel() for p in model.parameters())
    seconds = statistics.median(times)
    achieved = 6 * params * rows * length / seconds / 1e12
    peak = peak_tflops(torch.cuda.get_device_name())
    return {
        "learner tokens/s": rows * length / seconds,
        "learner TFLOP/s": achieved,
        "learner MFU": achieved / peak if peak else None,
        "learner peak GPU memory (GB)": torch.cuda.max_memory_allocated() / 2**30,
    }


def grpo_steps(model_name: str, steps: int) -> dict[str, Any]:
    from palaestra.config import load_config
    from palaestra.rundir import RunDir
    from palaestra.trainer.stages.grpo import run_grpo

    config = load_config(
        CONFIG,
        [f"model={model_name}", "device=cuda", f"trainer.steps={steps}", "eval.before=false",
         "eval.after=false", "run.progress=false", "run.log_trajectories=0"],
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run", config.model_dump(mode="json"))
        run_grpo(config, run)
        run.close()
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "train"][1:]
    episodes = config.rollout.tasks_per_step * config.rollout.group_size
    step_s = sum(r["time/step_s"] for r in records)
    return {
        "GRPO tokens/s": sum(r["tokens_mean"] * episodes for r in records) / step_s,
        "GRPO step s (median)": statistics.median(r["time/step_s"] for r in records),
        "rollout share": sum(r["time/rollout_wait_s"] for r in records) / step_s,
        "GRPO peak GPU memory (GB)": torch.cuda.max_memory_allocated() / 2**30,
    }


def measure(model_name: str, steps: int = 5) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    return (
        {"device": torch.cuda.get_device_name(), "model": model_name}
        | grpo_steps(model_name, steps)
        | learner_mfu(model_name)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.steps), indent=1))


if __name__ == "__main__":
    main()
