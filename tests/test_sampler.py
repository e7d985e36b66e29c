"""The project's own generator: splitmix64 over a counter, its masks pinned (a file stores a
rand mask as its recipe, so the mask must never change under it), exactly k sorted distinct
positions, uniform in both of its regimes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shira_fx import sampler
from tests.conftest import budget

FAST = settings(max_examples=budget(200, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _splitmix64(state: int, count: int) -> list[int]:
    """splitmix64 as its authors define it, in Python ints: the generator's specification."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_the_generator_is_splitmix64_and_its_masks_are_pinned():
    """If any of these change, every rand-coded file ever written decodes to another mask (and
    is refused by its checksum): change `sampler.ALGORITHM` instead, keeping the old one."""
    for key in (0, 12345, 2**64 - 1):
        assert [int(v) for v in sampler.stream(key, 0, 5)] == _splitmix64(key, 5)
        assert [int(v) for v in sampler.stream(key, 3, 2)] == _splitmix64(key, 5)[3:]
    assert sampler.key_of(0, "model.layers.0.self_attn.q_proj") == 0xAE18BA12AA96D3E0
    assert sampler.sample(1000, 10, sampler.key_of(7, "w")).tolist() == [
        182, 186, 187, 318, 379, 416, 437, 618, 686, 719]
    assert sampler.sample(40, 30, sampler.key_of(7, "w")).tolist() == [  # the ranked (dense) path
        0, 4, 5, 6, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 26, 27, 29, 30, 31,
        33, 34, 35, 37, 38]
    assert sampler.sample(2**31, 4, sampler.key_of(-3, "big")).tolist() == [
        448786240, 904536531, 1459309133, 1505504855]
    assert sampler.sample(100_000, 300, sampler.key_of(1, "drop")).tolist()[:8] == [
        528, 810, 2514, 2956, 3187, 3263, 3443, 3785]


@pytest.mark.fuzz
@FAST
@given(n=st.integers(1, 5000), data=st.data(), key=st.integers(0, 2**64 - 1))
def test_sample_is_k_sorted_distinct_positions_and_repeats(n, data, key):
    k = data.draw(st.integers(0, n))
    x = sampler.sample(n, k, key)
    assert x.dtype == np.int32 and x.size == k
    assert bool((np.diff(x) > 0).all()) and (k == 0 or (x[0] >= 0 and x[-1] < n))
    assert np.array_equal(x, sampler.sample(n, k, key))


def test_sample_is_uniform_over_positions_in_both_regimes():
    trials, n = 3000, 24
    for k in (4, 12):  # k * 4 <= n draws and drops a surplus; above it ranks every position
        counts = np.zeros(n)
        for key in range(trials):
            counts[sampler.sample(n, k, key)] += 1
        p = k / n
        assert float(np.abs(counts - trials * p).max()) < 5 * (trials * p * (1 - p)) ** 0.5, k
