"""Shared fixtures. Multi-rank checks run once per module under torchrun (see tests/dist/)."""

import os

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
    """tests/dist/core_checks.py on 2 ranks, once per session (used by several test modules)."""
    return run_torchrun("core_checks.py", 2, tmp_path_factory.mktemp("core"))


def pytest_configure(config):
    """Filter exactly the known megatron-core warnings (megatron_lcl/known_warnings.py), never whole
    categories: pytest's own warning capture replaces the filters `import megatron_lcl` installs."""
    from megatron_lcl.known_warnings import KNOWN_WARNINGS

    for message, category in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
