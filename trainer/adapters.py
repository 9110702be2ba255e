"""LoRA adapters on the policy (peft): wrap, score, reference, save and restore.

With ``lora`` set, a stage wraps its freshly loaded model with peft LoRA adapters
(``with_adapters``): the base weights are frozen and only the adapters' ``A`` and ``B``
train (``B`` starts at zero, so the wrapped model starts as the base model exactly). The
rest of palaestra handles the wrapped model through this module:

- **forward**: ``causal_lm`` is the Hugging Face model under the wrapper, its adapter
  layers in place and active; the learner's ``token_logprobs`` runs on it.
- **reference**: ``AdaptersOff`` is the policy with its adapters disabled while it scores,
  i.e. the base model, holding no weights of its own (no second copy).
- **sync**: ``adapter_weights`` are the only tensors that change, so they are all an
  engine's copy of the wrapped model needs after each step.
- **checkpoints**: ``save_merged`` writes the merged model in Hugging Face format (loadable
  without peft: the next stage, ``palaestra eval``) with the adapter alone in ``adapter/``
  (loadable with ``peft.PeftModel.from_pretrained`` on the base); a training state holds
  the adapter only (``save_adapter`` / ``load_adapter``), as the base is the stage's
  starting model.

What this module does not do: adapters in vLLM (the config refuses ``engine: vllm`` and
``openai`` with ``lora``), adapters on a reward model or a critic, or several adapters on
one model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import peft
import torch
from peft.tuners.lora import LoraLayer

from palaestra.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from palaestra.config import LoRAConfig

ADAPTER_DIR = "adapter"
"""Where a checkpoint keeps the adapter (peft's format), beside the merged weights."""

ADAPTER_MARK = "lora_"
"""What every adapter tensor's name holds (peft's own test of what is LoRA's)."""


def with_adapters(model: PreTrainedModel, lora: LoRAConfig) -> peft.PeftModel:
    """``model`` wrapped with fresh LoRA adapters; only they require grad. The wrapper
    takes ``model`` over: its layers are replaced in place by adapter layers. Raises
    ``ConfigError`` naming ``lora.target_modules`` when it names no layer of the model, or
    an output head tied to the input embeddings (one tensor: a merged checkpoint could not
    hold the head's update apart from the embeddings')."""
    settings = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type=peft.TaskType.CAUSAL_LM,
    )
    try:
        adapted = peft.get_peft_model(model, settings)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"lora.target_modules: {exc}") from None
    head: Any = hf_model(adapted).get_output_embeddings()
    embeddings = hf_model(adapted).get_input_embeddings()
    if isinstance(head, LoraLayer) and head.get_base_layer().weight is embeddings.weight:
        raise ConfigError(
            "lora.target_modules: the model's output head shares its weight with the input "
            "embeddings, so an adapter on it cannot be merged: leave the head out"
        )
    return adapted.eval()  # as load_model leaves a model: the learner switches per step


def is_adapted(model: torch.nn.Module) -> TypeGuard[peft.PeftModel]:
    """Whether ``model`` carries LoRA adapters (a peft wrapper)."""
    return isinstance(model, peft.PeftModel)


class AdaptersOff(torch.nn.Module):
    """The reference policy of a LoRA run: the policy itself with its adapters disabled
    while it scores, which is the base model. Its parameters are the policy's own objects
    (no copy); ``causal_lm`` disables the adapters around each forward."""

    def __init__(self, policy: peft.PeftModel) -> None:
        super().__init__()
        self.policy = policy


@contextlib.contextmanager
def causal_lm(model: torch.nn.Module) -> Iterator[PreTrainedModel]:
    """The Hugging Face causal LM to run ``model``'s forward on: ``model`` itself, the model
    under a peft wrapper (adapter layers active), or for ``AdaptersOff`` that model with the
    adapters disabled until the context exits."""
    if isinstance(model, AdaptersOff):
        with model.policy.disable_adapter():
            yield hf_model(model.policy)
    elif is_adapted(model):
        yield hf_model(model)
    else:
        yield cast("PreTrainedModel", model)


def hf_model(model: peft.PeftModel) -> PreTrainedModel:
    """The Hugging Face model under a peft wrapper, its adapter layers in place."""
    return cast("PreTrainedModel", model.get_base_model())


def adapter_weights(model: peft.PeftModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapters' tensors by the wrapper's state-dict names: all that training changes."""
    for name, tensor in model.state_dict().items():
        if ADAPTER_MARK in name:
            yield name, tensor


def merged_state_dict(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged into its layer's weight
    (``W + B @ A * alpha / rank``), under the base model's own names; ``model`` is not
    changed (peft's ``merge_and_unload`` would replace its layers)."""
    base = hf_model(model)
    merged = {}
    for name, tensor in base.state_dict().items():
        if ADAPTER_MARK not in name:
            merged[name.replace(".base_layer.", ".")] = tensor
    with torch.no_grad():
        for name, layer in base.named_modules():
            if isinstance(layer, LoraLayer) and not layer.merged:
                adapted: Any = layer  # peft's Linear, Embedding, ... define get_delta_weight
                delta = sum(adapted.get_delta_weight(a) for a in layer.active_adapters)
                merged[f"{name}.weight"] = adapted.get_base_layer().weight + delta
    return merged


def save_merged(model: peft.PeftModel, directory: Path) -> None:
    """Write the merged model in Hugging Face format into ``directory`` and the adapter
    into ``directory/adapter``."""
    hf_model(model).save_pretrained(directory, state_dict=merged_state_dict(model))
    save_adapter(model, directory)


def save_adapter(model: peft.PeftModel, directory: Path) -> None:
    """Write the adapter (peft's format: ``adapter_config.json``, safetensors) into
    ``directory/adapter``."""
    model.save_pretrained(str(directory / ADAPTER_DIR))


def load_adapter(model: peft.PeftModel, directory: Path) -> None:
    """Load the adapter ``save_adapter`` wrote into ``directory`` into ``model`` in place;
    ``ValueError`` if its tensors do not fit ``model``'s adapters."""
    weights: dict[str, Any] = peft.utils.load_peft_weights(str(directory / ADAPTER_DIR))
    result: Any = peft.set_peft_model_state_dict(model, weights)
    missing = [name for name in result.missing_keys if ADAPTER_MARK in name]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the adapter in {directory / ADAPTER_DIR} does not fit the model's adapters "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )
