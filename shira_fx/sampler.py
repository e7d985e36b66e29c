"""The project's own random generator and the uniform k-subset of [0, n) the rand mask is.

A shira_fx file stores a rand mask as its recipe (seed, layer name, count), so the mask must
come out bit for bit the same from any torch or numpy release, on any machine. torch's
`randint`/`randperm` streams carry no such promise; this module defines its own: splitmix64
over a counter (numpy uint64 arithmetic, modulo 2^64 by definition), an exact integer
reduction to [0, n), and sorts of values only (never of keys that may tie), so every step
has one possible result. `ALGORITHM` names this definition; files record it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

ALGORITHM = 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's counter increment
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHILD = 0xD1B54A32D192ED03  # derives the key of a sub-draw from its parent's
_LOW32 = np.uint64(0xFFFFFFFF)
_DENSE_FRACTION = 4  # above numel / 4 draws, rank every position instead of drawing
_MAX_N = 2**31  # offsets are int32


def key_of(seed: int, name: str) -> int:
    """The 64-bit key of one layer's stream: from the config's seed and the layer's name."""
    digest = hashlib.sha256(f"shira_fx rand {ALGORITHM}|{seed}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function (a bijection of uint64 with full avalanche), in place."""
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def stream(key: int, start: int, count: int) -> np.ndarray:
    """Words `start .. start + count - 1` of the key's stream (uint64): splitmix64 seeded
    with `key`, computed directly from the counter, so any slice costs only its length."""
    z = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z *= _GOLDEN
        z += np.uint64(key)
        return _mix(z)


def _below(words: np.ndarray, n: int) -> np.ndarray:
    """floor(word * n / 2^64) for n <= 2^31, exactly, in uint64 arithmetic (int32): uniform
    in [0, n) to within n / 2^64 (no modulo bias worth the name). Consumes `words`."""
    m = np.uint64(n)
    hi = words >> np.uint64(32)
    words &= _LOW32
    words *= m
    words >>= np.uint64(32)
    hi *= m
    hi += words
    hi >>= np.uint64(32)
    return hi.astype(np.int32)


def _by_rank(n: int, k: int, key: int) -> np.ndarray:
    """The k positions of [0, n) whose stream words are smallest (ties to the lower position):
    a word's top bits above the position's bits make every sort key distinct."""
    if k == n:
        return np.arange(n, dtype=np.int32)
    bits = max(1, (n - 1).bit_length())
    words = stream(key, 0, n) >> np.uint64(bits + 1)
    ranked = (words << np.uint64(bits)).astype(np.int64) | np.arange(n, dtype=np.int64)
    return np.sort(np.sort(ranked)[:k] & ((1 << bits) - 1))


def _sorted(values: np.ndarray, n: int) -> np.ndarray:
    """`values` (uniform in [0, n)) sorted: first by their top 16 bits (a counting sort, numpy's
    radix sort of uint16), then the nearly sorted rest by timsort, 1.4-2.6x faster than a
    comparison sort here. A sort of values: the result is the same whatever the algorithm."""
    if values.size < 1024:
        return np.sort(values)
    top = (values >> max(0, (n - 1).bit_length() - 16)).astype(np.uint16)
    return np.sort(values[np.argsort(top, kind="stable")], kind="stable")


def distinct(sorted_values: np.ndarray) -> np.ndarray:
    """The distinct values of a sorted array, in order."""
    if sorted_values.size < 2:
        return sorted_values
    return sorted_values[np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))]


def _first_distinct(n: int, k: int, key: int) -> np.ndarray:
    """The first k distinct values in [0, n) of the key's stream (a uniform k-subset), sorted:
    its definition does not depend on how many words are drawn to find them."""
    count = 2 * k + 16
    while True:
        draws = _below(stream(key, 0, count), n).astype(np.int64)
        ranked = np.sort((draws << 32) | np.arange(count, dtype=np.int64))  # by value, then position
        values = ranked >> 32
        first = np.concatenate(([True], values[1:] != values[:-1]))
        if int(first.sum()) >= k:
            break
        count *= 2
    at = ranked[first] & 0xFFFFFFFF  # where each value first appears
    return values[first][at <= np.partition(at, k - 1)[k - 1]]


def _sample(n: int, k: int, key: int) -> np.ndarray:
    if k * _DENSE_FRACTION > n:
        return _by_rank(n, k, key)
    picked = np.empty(0, dtype=np.int32)
    used = 0
    while picked.size < k:  # how many words each round draws is part of the definition
        need = k - picked.size
        repeats = need * (2 * picked.size + need) // (2 * n)
        count = need + repeats + 4 * math.isqrt(repeats) + 16
        draws = _below(stream(key, used, count), n)
        used += count
        picked = distinct(_sorted(np.concatenate([picked, draws]) if picked.size else draws, n))
    surplus = picked.size - k
    if surplus:
        keep = np.ones(picked.size, dtype=bool)
        child = int(_mix(np.array([key ^ _CHILD], dtype=np.uint64))[0])
        keep[_first_distinct(picked.size, surplus, child)] = False
        picked = picked[keep]
    return picked


def sample(n: int, k: int, key: int) -> np.ndarray:
    """k distinct positions of [0, n), sorted (int32), uniformly random given `key`.

    Draws with replacement, deduplicated and topped up until at least k are distinct (the
    distinct draws are a uniform subset given their number), then a surplus is dropped: the
    first distinct draws of a derived key's stream, as positions among them. Each round draws
    what is missing plus the duplicates it should expect (and 4 of their standard deviations),
    so the surplus stays small. O(k) memory; above n / 4 every position is ranked instead.
    Sorts are numpy's (of values, so any sort algorithm gives the same result); numpy runs
    single-threaded, so a busy machine does not slow the small sorts down as torch's can."""
    if not 0 <= k <= n <= _MAX_N:
        raise ValueError(f"sample: need 0 <= k <= n <= 2^31, found k={k}, n={n}")
    return _sample(n, k, key).astype(np.int32, copy=False)
