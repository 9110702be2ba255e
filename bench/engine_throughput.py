"""Rollout throughput: vLLM engine against the transformers engine on the same prompts.

Samples ``--prompts`` chat prompts (addition questions, the main job's task) with both
engines at temperature 1, all requests in flight at once, and prints sampled tokens per
second and their ratio. For the vLLM engine it also prints start-up time, the seconds of
one full weight sync, and how far its logprobs are from the learner's float32 ones
before and after that sync (``trainer.weight_sync``).

    .venv/bin/python bench/engine_throughput.py --model smollm2-135m --dtype bfloat16

Needs vLLM (``make setup-vllm``). Numbers, not assertions: the machine decides them.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from palaestra.agent.engines import SamplingParams, TransformersEngine
from palaestra.agent.engines.vllm import VLLMEngine
from palaestra.models import load_model, resolve_model, turn_end_ids
from palaestra.trainer.weight_sync import verify_engine_weights


async def sampled_tokens_per_s(engine, prompts: list[list[int]], max_tokens: int) -> float:
    sampling = [
        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i) for i in range(len(prompts))
    ]
    started = time.perf_counter()
    completions = await asyncio.gather(
        *[engine.generate(p, s) for p, s in zip(prompts, sampling, strict=True)]
    )
    elapsed = time.perf_counter() - started
    return sum(len(c.token_ids) for c in completions) / elapsed


async def main(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model)
    eos = turn_end_ids(model, tokenizer)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {2 * i + 3}? Think step by step."}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(args.prompts)
    ]
    started = time.perf_counter()
    vllm_engine = VLLMEngine.from_model_dir(
        resolve_model(args.model), eos_token_ids=eos, dtype=args.dtype, max_model_len=1024
    )
    startup_s = time.perf_counter() - started
    try:
        await sampled_tokens_per_s(vllm_engine, prompts[:2], 8)  # warm-up
        vllm_tps = await sampled_tokens_per_s(vllm_engine, prompts, args.max_tokens)
        probe = prompts[0] + list(
            (
                await vllm_engine.generate(prompts[0], SamplingParams(max_tokens=64, seed=0))
            ).token_ids
        )
        before = await verify_engine_weights(vllm_engine, model, probe, tolerance=float("inf"))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 1e-3)
        await vllm_engine.update_weights(model.state_dict().items(), version=1)
        after = await verify_engine_weights(vllm_engine, model, probe, tolerance=float("inf"))
    finally:
        vllm_engine.close()
    hf_engine = TransformersEngine(
        model, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, dtype=args.dtype
    )
    await sampled_tokens_per_s(hf_engine, prompts[:2], 8)
    hf_tps = await sampled_tokens_per_s(hf_engine, prompts, args.max_tokens)
    print(f"model {args.model}, {args.dtype}, {args.prompts} prompts x {args.max_tokens} tokens")
    print(f"vllm start-up            {startup_s:8.1f} s")
    print(f"vllm weight sync         {vllm_engine.last_sync_s:8.2f} s")
    print(
        f"vllm |Δ logprob| before  max {before.max_abs_dlogprob:.2e} mean {before.mean_abs_dlogprob:.2e} ({before.num_tokens} tokens)"
    )
    print(
        f"vllm |Δ logprob| after   max {after.max_abs_dlogprob:.2e} mean {after.mean_abs_dlogprob:.2e}"
    )
    print(f"vllm tokens/s            {vllm_tps:8.1f}")
    print(f"transformers tokens/s    {hf_tps:8.1f}")
    print(f"ratio vllm / transformers {vllm_tps / hf_tps:7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    asyncio.run(main(parser.parse_args()))
