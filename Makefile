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

# The whole suite on TEST_WORKERS pytest-xdist workers, a test module whole on one worker (its
# module-scoped launch runs once); the 25 slowest tests are listed at the end. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# The checks a change most often breaks, in minutes (tests/conftest.py: FAST_TESTS); no multi-rank launch.
test-fast: install
	$(PY) -m pytest -q -m fast --durations=10 tests

demo: install
	bash examples/demo.sh

clean:
	rm -rf $(VENV) demo_out *.egg-info

# The suite on Python 3.12 with the newest megatron-core of the supported range (0.19.x; README
# "Upgrading megatron-core"), in its own virtualenv built from PyPI on first use: PyPI's torch for
# cp312 (a CUDA build, runs on CPU, ~5 GB; it brings triton, which megatron-core 0.19 imports).
# PYTEST_ARGS picks the tests, e.g. `make test-mcore-latest PYTEST_ARGS=tests/training/test_core_parallel.py`.
PYTHON_LATEST ?= python3.12
VENV_LATEST   ?= .venv-mcore-latest
MCORE_LATEST  ?= megatron-core>=0.19,<0.20
PYTEST_ARGS   ?= --durations=25 tests

.PHONY: test-mcore-latest
$(VENV_LATEST)/.installed: setup.py
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install -q torch triton "$(MCORE_LATEST)"
	$(VENV_LATEST)/bin/python -m pip install -q -e ".[dev]"
	touch $@

test-mcore-latest: $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python -c "import megatron.core as m, sys; print('megatron-core', m.__version__, 'python', sys.version.split()[0])"
	$(VENV_LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)
