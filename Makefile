# Entry points: `make demo`, `make test` (everything) and `make test-fast` (the fast tier, for iterating).
# All build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The whole suite; the 25 slowest tests are listed at the end.
test: install
	$(PY) -m pytest -q --durations=25 tests

# The checks a change most often breaks, in minutes (tests/conftest.py: FAST_TESTS); no multi-rank launch.
test-fast: install
	$(PY) -m pytest -q -m fast --durations=10 tests

demo: install
	bash examples/demo.sh

clean:
	rm -rf $(VENV) demo_out *.egg-info
