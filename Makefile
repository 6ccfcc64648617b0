# Every target creates the virtual environment on first use, so a fresh clone needs only
# Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint format bench chaos clean browser

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

# The ops page's browser test (tests/test_ui_browser.py) drives Debian's headless Chromium through
# chromedriver. As root (CI, the development machines), install them when missing; otherwise say
# how (the test then skips, except under CI=true, where it fails).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "browser tests: run 'sudo apt-get install -y chromium chromium-driver' to enable them"; fi

test: lint browser
	$(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks chaos
	$(BIN)/ruff check --fix src tests benchmarks chaos

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The durability rig (chaos/): 20 minutes of faults per transport, then a reconciling check.
# It starts its own Redis and creates its own PostgreSQL database; exits 1 on any loss.
chaos: $(STAMP)
	$(BIN)/python -m chaos --duration 1200 --rate 30 --fault-every 1.5 --report chaos/REPORT.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
