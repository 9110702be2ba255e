"""Shared fixtures: the tiny random model's tokenizer, a small JSONL math task file, a
tiny random model that vLLM can serve, and ``palaestra-test/OddLength-v0``, a one-turn env
whose rewards differ within a group."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from palaestra.envs import register
from palaestra.envs.core import TextEnv
from palaestra.models import load_tokenizer, resolve_model


class OddLength(TextEnv):
    """One turn; reward 1 for a reply of odd length, so groups have winners and losers."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return [{"role": "user", "content": "Say anything."}], {"task_id": f"t{seed}"}

    def step(self, action):
        return [], float(len(action) % 2), True, False, {}


register("palaestra-test/OddLength-v0", lambda **kwargs: OddLength())

VLLM_TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}
"""``tiny-random`` has head_dim 4; vLLM's CPU attention takes head sizes from 32 up."""


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer and chat template (shared by tiny-random and the embedded model)."""
    return load_tokenizer("tiny-random")


@pytest.fixture
def math_tasks(tmp_path):
    """A JSONL file of 8 addition questions."""
    path = tmp_path / "tasks.jsonl"
    rows = [{"question": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(1, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def vllm_tiny_model_dir(tmp_path_factory):
    """``tiny-random``'s config and tokenizer at a shape vLLM serves, random float32 weights
    (std 0.5, fixed seed) with tied embeddings, saved as a Hugging Face directory."""
    source = resolve_model("tiny-random")
    config = AutoConfig.from_pretrained(source)
    config.update(VLLM_TINY_SHAPE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("vllm-tiny")
    model.save_pretrained(out)
    load_tokenizer("tiny-random").save_pretrained(out)
    return out
