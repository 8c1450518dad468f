"""Shared fixtures. Multi-rank checks run once per module under torchrun (see tests/dist/)."""

import pytest

from multirank import run_torchrun


@pytest.fixture(scope="session")
def single_rank():
    """megatron-core initialised in this process: world size 1, TP=PP=DP=1 (gloo on CPU)."""
    from megatron_lcl.config import ParallelConfig
    from megatron_lcl.runtime import initialize_distributed

    initialize_distributed(ParallelConfig(), seed=1234)
    yield


@pytest.fixture(scope="session")
def core_checks_dir(tmp_path_factory):
    """tests/dist/core_checks.py on 2 ranks, once per session (used by several test modules)."""
    return run_torchrun("core_checks.py", 2, tmp_path_factory.mktemp("core"))


def pytest_configure(config):
    """Filter exactly the known megatron-core warnings (runtime/mcore_compat.py), never whole categories."""
    from megatron_lcl.runtime.mcore_compat import KNOWN_WARNINGS

    for message, category in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
