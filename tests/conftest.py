"""Test tiers and budgets.

`python -m pytest -q` runs the fast tier (tests not marked `slow`) with the "fast" hypothesis
profile; `python -m pytest -q -m slow` runs the slow tier with the "full" profile, and the
tests marked `fuzz` run in both tiers, each with its tier's budget (`budget`).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, so this must run before
# any test module imports shira_fx.kernels; without a GPU the kernels then run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_COMMON = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("fast", max_examples=10, **_COMMON)
settings.register_profile("full", max_examples=100, **_COMMON)
FAST_FRACTION = 20  # the fast tier runs 1/20 of a test's full budget


def _slow_tier(config: pytest.Config) -> bool:
    return config.getoption("markexpr", "").strip() == "slow"


def budget(full: int, least: int = 5) -> int:
    """A hypothesis test's example count: `full` in the slow tier, 1/20 of it (at least
    `least`) in the fast tier."""
    if settings.get_current_profile_name() == "full":
        return full
    return max(least, full // FAST_FRACTION)


def pytest_configure(config: pytest.Config) -> None:
    settings.load_profile("full" if _slow_tier(config) else "fast")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Distributed tests belong to the slow tier; in the slow tier the fuzz tests run again,
    with their full budgets."""
    slow_tier = _slow_tier(config)
    for item in items:
        if item.get_closest_marker("distributed") is not None or (
                slow_tier and item.get_closest_marker("fuzz") is not None):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _outside_the_repository(tmp_path_factory):
    """Compiles run in a temporary working directory: a partitioner dump can never land in the
    source tree."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
