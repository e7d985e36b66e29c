"""Index codes: every code round-trips exactly over drawn shapes and densities, the smallest
applicable code is chosen (and only one that decodes to its input), and a hostile code is
refused with its problem named."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shira_fx import index_codes, sampler
from shira_fx.index_codes import CODES, IndexCode, IndexCodeError, checksum, code_size, decode, encode
from shira_fx.masks import rand_mask, struct_mask
from tests.conftest import budget

FAST = settings(max_examples=budget(200, 25), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- masks to code: drawn shapes, densities and kinds ----------------------------------------
def _mask(kind: str, shape: tuple[int, ...], transposed: bool, density: float, seed: int) -> torch.Tensor:
    numel = math.prod(shape)
    k = max(1, min(numel, round(density * numel)))
    if kind == "rand":
        experts = shape[0] if len(shape) == 3 else 1
        return rand_mask(numel, max(1, k // experts), seed, "layer", experts)
    if kind == "struct":
        rows, cols = (shape[1], shape[0]) if transposed else shape
        return struct_mask(rows, cols, k, seed, transposed)
    g = torch.Generator().manual_seed(seed)
    if kind == "runs":  # a few blocks of consecutive offsets
        starts = torch.randint(0, numel, (3,), generator=g)
        x = torch.cat([torch.arange(s, min(numel, s + 1 + int(density * numel))) for s in starts.tolist()])
        return x.unique().int()
    return torch.randperm(numel, generator=g)[:k].sort().values.int()


shapes = st.one_of(st.tuples(st.integers(1, 70), st.integers(1, 70)),
                   st.tuples(st.integers(1, 4), st.integers(1, 20), st.integers(1, 20)))


@pytest.mark.fuzz
@FAST
@given(shape=shapes, transposed=st.booleans(), density=st.floats(0.001, 1.0), seed=st.integers(0, 10**6),
       source=st.sampled_from(["rand", "struct", "random", "runs"]), kind=st.sampled_from(CODES),
       dtype=st.sampled_from([torch.int32, torch.int64]))
def test_every_code_round_trips_exactly(shape, transposed, density, seed, source, kind, dtype):
    transposed = transposed and len(shape) == 2
    assume(not (source == "struct" and len(shape) == 3))
    idx = _mask(source, shape, transposed, density, seed).to(dtype)
    try:
        code, data = encode(idx, shape, transposed, "layer", rand_seed=seed, kinds=(kind,))
    except ValueError:  # the code does not apply: a rand recipe of another mask, struct of 3-D
        assert kind == "rand" and source != "rand" or kind == "struct" and len(shape) == 3
        return
    assert code.kind == kind and code.check == checksum(idx)
    assert data.dtype == np.uint8 and data.size == code_size(code, idx.numel(), shape, transposed)
    json.dumps([code.kind, code.args])  # the layer table holds it
    out = decode(code, data, idx.numel(), shape, transposed, "layer", seed)
    assert out.dtype == torch.int64 and torch.equal(out, idx.long())


@pytest.mark.fuzz
@FAST
@given(shape=shapes, transposed=st.booleans(), density=st.floats(0.001, 1.0), seed=st.integers(0, 10**6),
       source=st.sampled_from(["rand", "struct", "random", "runs"]))
def test_the_chosen_code_is_the_smallest_that_applies(shape, transposed, density, seed, source):
    transposed = transposed and len(shape) == 2
    assume(not (source == "struct" and len(shape) == 3))
    idx = _mask(source, shape, transposed, density, seed)

    def cost(code, data):
        return data.size + len(json.dumps([code.kind, code.args], separators=(",", ":")))

    chosen = cost(*encode(idx, shape, transposed, "layer", rand_seed=seed))
    for kind in CODES:
        try:
            assert chosen <= cost(*encode(idx, shape, transposed, "layer", rand_seed=seed, kinds=(kind,)))
        except ValueError:
            continue


def test_each_code_is_chosen_where_it_is_smallest():
    shape = (64, 96)
    rand = rand_mask(64 * 96, 300, 5, "a")
    assert encode(rand, shape, False, "a", rand_seed=5)[0].kind == "rand"
    assert encode(struct_mask(64, 96, 700, 5, False), shape, False, "a")[0].kind == "struct"
    assert encode(struct_mask(96, 64, 700, 5, True), shape, True, "a")[0].kind == "struct"
    code, data = encode(rand, shape, False, "a")  # no recipe without a rand config: gap-coded
    assert code.kind == "gaps" and data.size * 8 / rand.numel() < 2 + math.log2(shape[0] * shape[1] / 300)
    assert encode(torch.tensor([2**31 - 2]), (2**16, 2**15), False, "a")[0].kind == "int32"


def test_a_rand_config_mask_that_differs_from_its_recipe_is_not_written_as_one():
    shape = (40, 50)
    idx = rand_mask(40 * 50, 100, 3, "a").long()
    free = int(np.setdiff1d(np.arange(2000), idx.numpy())[0])
    hand_made = torch.cat([idx[1:], torch.tensor([free])]).sort().values  # one position moved
    for other, seed, name in ((hand_made, 3, "a"), (idx, 4, "a"), (idx, 3, "b")):
        code, data = encode(other, shape, False, name, rand_seed=seed)
        assert code.kind != "rand"
        assert torch.equal(decode(code, data, other.numel(), shape, False, name, seed), other)


def test_the_encoder_takes_no_code_that_does_not_decode_to_its_input(monkeypatch):
    idx = rand_mask(64 * 96, 300, 5, "a")
    real = index_codes._pack
    monkeypatch.setattr(index_codes, "_pack", lambda gaps, b: real(gaps + 1, b))  # a broken packer
    code, data = encode(idx, (64, 96), False, "a")
    assert code.kind == "int32"
    assert torch.equal(decode(code, data, idx.numel(), (64, 96), False, "a", 0), idx.long())


def test_the_gap_code_is_within_a_few_percent_of_the_entropy():
    for numel, k in ((512 * 512, 8192), (2048 * 5632, 61440), (10**6, 50_000)):
        x = rand_mask(numel, k, 0, "a")
        code, data = encode(x, (numel, 1), False, "a", kinds=("gaps",))
        d = k / numel
        entropy_bits = math.log2(1 / d) + (1 - d) / d * math.log2(1 / (1 - d))
        assert data.size * 8 / k < 1.03 * entropy_bits, (numel, k)


# -- hostile codes ---------------------------------------------------------------------------
def _valid(kind: str):
    shape = (30, 40)
    idx = {"rand": rand_mask(1200, 60, 1, "a"), "struct": struct_mask(30, 40, 100, 1, False),
           "gaps": rand_mask(1200, 60, 2, "a"), "int32": torch.tensor([3, 17, 1199])}[kind]
    code, data = encode(idx, shape, False, "a", rand_seed=1, kinds=(kind,))
    return code, data, idx.numel(), shape


def _refused(code, data, nnz, shape, match=None, seed=1, name="a") -> str:
    """Assert that decoding is refused (with `match` in the message, if given); the message."""
    with pytest.raises(IndexCodeError, match=match) as refused:
        decode(code, data, nnz, shape, False, name, seed)
    return str(refused.value)


@pytest.mark.parametrize("kind", CODES)
def test_a_wrong_checksum_or_count_is_refused(kind):
    code, data, nnz, shape = _valid(kind)
    flipped = code.check[:-1] + ("0" if code.check[-1] != "0" else "1")
    _refused(IndexCode(code.kind, code.args, flipped), data, nnz, shape,
             "regenerated from its recipe|do not match the checksum")
    _refused(code, data, nnz + 1, shape, "bytes|offsets|cannot|fit|covers|checksum|room|regenerated")
    _refused(IndexCode(code.kind, code.args, "xyz"), data, nnz, shape, "hex digits")


def test_a_rand_recipe_of_another_seed_name_or_generator_is_refused():
    code, data, nnz, shape = _valid("rand")
    _refused(code, data, nnz, shape, "regenerated from its recipe", seed=2)
    _refused(code, data, nnz, shape, "regenerated from its recipe", name="b")
    _refused(IndexCode("rand", [sampler.ALGORITHM + 1, 1], code.check), data, nnz, shape, "generator version")
    _refused(IndexCode("rand", [True, 1], code.check), data, nnz, shape, "generator version")
    for matrices in (0, 7, True, 1.0):  # blocks that do not split the weight or the count
        _refused(IndexCode("rand", [sampler.ALGORITHM, matrices], code.check), data, nnz, shape, "blocks")
    _refused(IndexCode("rand", [sampler.ALGORITHM, 2], code.check), data, nnz, shape, "regenerated")


@pytest.mark.parametrize("kind", ["gaps", "struct"])
def test_truncated_padded_or_flipped_bytes_are_refused(kind):
    code, data, nnz, shape = _valid(kind)
    assert checksum(decode(code, data, nnz, shape, False, "a", 1)) == code.check  # intact: decodes
    _refused(code, data[:-1], nnz, shape, "takes")
    _refused(code, np.concatenate([data, [0]]).astype(np.uint8), nnz, shape, "takes")
    messages = []
    for pos in range(data.size):
        for bit in range(8):
            bad = data.copy()
            bad[pos] ^= 1 << bit
            messages.append(_refused(code, bad, nnz, shape))
    assert len(messages) == 8 * data.size and all(messages)


def test_gap_code_arguments_that_cannot_hold_are_refused_before_decoding():
    code, data, nnz, shape = _valid("gaps")
    first, least, b, size = code.args
    for args, match in (([first, least, 32, size], "do not fit"),
                        ([first, least, b, size + 1], "takes|cannot"),
                        ([1200, least, b, size], "do not fit"), ([first, 10**6, b, size], "do not fit"),
                        ([first, least, b], "args"), ([first, -1, b, size], "ints >= 0"),
                        ([first, least, b, float(size)], "ints >= 0")):
        _refused(IndexCode("gaps", args, code.check), data, nnz, shape, match)
    _refused(IndexCode("gaps", [first, least, b, size], code.check), data, nnz, (30, 39))


def test_int32_offsets_unsorted_duplicated_or_out_of_range_are_refused():
    shape = (30, 40)
    for offsets, match in (([17, 3, 50], "not sorted"), ([3, 3, 50], "not sorted"),
                           ([3, 50, 1200], "in \\[0"), ([-1, 3, 50], "in \\[0")):
        x = np.array(offsets, dtype="<i4")
        _refused(IndexCode("int32", [], checksum(x)), x.view(np.uint8), 3, shape, match)


def test_struct_parts_that_would_allocate_more_than_the_mask_are_refused():
    code, data, nnz, shape = _valid("struct")
    diag, rows, cols, runs = code.args
    huge = [10**6, 0, 0, 0, (10**6 + 6) // 8]
    for args, match in (([diag, [30, 0, 0, 0, 4], cols, runs], "room for"),
                        ([diag, rows, huge, runs], "do not fit|room"),
                        ([2, rows, cols, runs], "diagonal"), ([diag, rows, cols], "args"),
                        ([diag, rows, cols, [3, 0, 0, 0, 1]], None)):
        _refused(IndexCode("struct", args, code.check), data, nnz, shape, match)
    _refused(code, data, nnz, (30, 40, 1), "2-D")


def test_an_unknown_or_malformed_code_is_refused():
    code, data, nnz, shape = _valid("gaps")
    for kind, args in (("zip", []), (["gaps"], code.args), ("gaps", "1,2"), ("gaps", None)):
        _refused(IndexCode(kind, args, code.check), data, nnz, shape, "index code must be")
