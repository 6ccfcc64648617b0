# Every target creates the virtual environment on first use, so a fresh clone needs only
# Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint format bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tidings demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks chaos
	$(BIN)/ruff format --check src tests benchmarks chaos
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks chaos
	$(BIN)/ruff check --fix src tests benchmarks chaos

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The durability rig (chaos/): 15 minutes of faults per transport, then a reconciling check.
# It starts its own Redis and creates its own PostgreSQL database; exits 1 on any loss.
chaos: $(STAMP)
	$(BIN)/python -m chaos --duration 900 --rate 30 --fault-every 1.5 --report chaos/REPORT.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
