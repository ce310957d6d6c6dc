# Every target sets up .venv first (scripts/setup-venv.sh), so each works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test lint bench

setup:
	@bash scripts/setup-venv.sh

# The default training run: offline, on the CPU, a few minutes (into runs/default; a second run
# there is refused: `make train ARGS=--overwrite` replaces it, `ARGS=--resume` continues it).
train: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/gist-fast train $(ARGS)

# Lint, then the whole test suite (CPU; Triton kernels under TRITON_INTERPRET=1).
test: setup
	$(VENV)/bin/ruff check gist_fast tests benchmarks
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_loss_cpu.py
