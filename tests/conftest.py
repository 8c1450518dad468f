"""Shared fixtures. Multi-rank checks run once per module under torchrun (see tests/dist/).

The fast tier (`make test-fast`, `pytest -m fast`): the checks a change most often breaks, in a few
minutes on 2 cores - configuration, layering, single-rank model and loss equivalences, data, and a
tiny in-process training run with its resume. Chosen here by test file or test id (`FAST_TESTS`),
marked `fast` at collection; no multi-rank launch is in it (those are `make test`)."""

import fcntl
import os
import warnings

import pytest

from multirank import run_torchrun


@pytest.fixture(scope="module")
def single_rank():
    """megatron-core initialised in this process: world size 1, TP=PP=DP=1 (gloo on CPU). Per module:
    modules that run the driver in process tear the process group down after them."""
    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.runtime import initialize_distributed

    initialize_distributed(ParallelConfig(), seed=1234)
    yield


@pytest.fixture(scope="module")
def restore_rendezvous_env():
    """In-process runs set RANK/WORLD_SIZE/MASTER_* in os.environ; later subprocesses (torchrun
    launches) must not inherit them. Modules that run in process use it with `usefixtures`."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def core_checks_dir(tmp_path_factory):
    """tests/dist/core_checks.py on 2 ranks, once per session (used by several test modules). Under
    pytest-xdist (`make test`) once for all workers: the first to get here launches it in the run's
    shared temporary folder, the others wait on a lock and read its results."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return run_torchrun("core_checks.py", 2, tmp_path_factory.mktemp("core"))
    shared = tmp_path_factory.getbasetemp().parent / "core_checks"  # pytest-N/, above popen-gwK/
    with open(shared.parent / "core_checks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return shared if (shared / "done").exists() else run_torchrun("core_checks.py", 2, shared)


def pytest_configure(config):
    """Filter exactly the known megatron-core warnings (megatron_lcl/known_warnings.py), never whole
    categories: pytest's own warning capture replaces the filters `import megatron_lcl` installs."""
    from megatron_lcl.known_warnings import KNOWN_WARNINGS

    for message, category in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


# The fast tier: a file (every test in it) or a test id without its parameters.
FAST_TESTS = (
    "tests/test_config.py",
    "tests/test_layering.py",
    "tests/models/test_model.py",
    "tests/models/test_layers.py",
    "tests/data/test_sample_builder.py",
    "tests/data/test_loader.py",
    "tests/data/test_readers.py",
    "tests/data/test_tokenizer.py",
    "tests/data/test_prepare.py",
    "tests/data/test_corrupt_shards.py",
    "tests/training/test_training.py::test_yaml_overrides_and_presets",
    "tests/training/test_training.py::test_resolved_config_round_trips",
    "tests/training/test_training.py::test_config_errors_name_the_field",
    "tests/training/test_training.py::test_validation_lists_every_problem",
    "tests/training/test_training.py::test_resume_equals_no_resume",  # the tiny training smoke
)


def fast_entry(nodeid: str):
    """The FAST_TESTS entry selecting test `nodeid` (its file, or its id without parameters), else None."""
    file, _, name = nodeid.partition("::")
    return next((entry for entry in (file, f"{file}::{name.split('[')[0]}") if entry in FAST_TESTS), None)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark the fast tier (test ids are relative to the repository root, where pytest.ini is). An entry
    that selects nothing although its file was collected, or whose file is gone, is reported: a test
    renamed or moved must not drop out of the tier unnoticed."""
    used, files = set(), {item.nodeid.partition("::")[0] for item in items}
    for item in items:
        entry = fast_entry(item.nodeid)
        if entry is not None:
            item.add_marker(pytest.mark.fast)
            used.add(entry)
    stale = [e for e in FAST_TESTS if e not in used and
             (e.partition("::")[0] in files or not (config.rootpath / e.partition("::")[0]).exists())]
    if stale:
        warnings.warn(pytest.PytestWarning(f"tests/conftest.py FAST_TESTS entries that select no test: {stale}"))
