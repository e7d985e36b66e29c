"""Triton kernels against their torch references; on CPU they run under TRITON_INTERPRET=1.

The masked gradient (SDDMM): every path of `masked_grad`, with and without a plan, against
`sddmm_reference` over shapes, densities, dtypes, T and mask kinds (random, struct rows,
struct columns of a transposed layout, the diagonal, empty, one element, all elements); the
plan itself; the cost model; no activation-sized copies. Then the fused scatter.
"""

import importlib
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from shira_fx.kernels import scatter
from shira_fx.kernels.masked_sddmm import PATHS, choose_path
from shira_fx.kernels.masked_sddmm import masked_sddmm as masked_grad
from shira_fx.kernels.scatter import scatter_fused_, scatter_fused_reference_
from shira_fx.kernels.sddmm import dense_block, sddmm, sddmm_cpu, sddmm_reference, sddmm_tiles
from shira_fx.kernels.sddmm_cpp import sddmm_diagonals, sddmm_rowdot
from shira_fx.kernels.structure import STRUCTURE_FIELDS, mask_structure
from tests.conftest import budget

sddmm_cpp = importlib.import_module("shira_fx.kernels.sddmm_cpp")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = st.sampled_from([torch.int32, torch.int64])
RTOL = 1e-5
MASK_KINDS = ["rand", "rows", "cols", "partial", "diagonal", "empty", "one", "all"]
# the CPU-only paths run on CPU tensors whatever the test device
CPU_ONLY = {"cpp_rowdot", "sampled_addmm"}


def _random_indices(n: int, density: float, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    k = min(n, math.ceil(density * n))
    return torch.randperm(n, generator=g)[:k].sort().values.to(dtype)


def _struct_indices(rows: int, cols: int, stride: int, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """SHiRA-struct's shape: every stride-th row of the logical (rows, cols) matrix plus its
    diagonal; stored (cols, rows) when transposed, where the rows become whole columns."""
    r, c = torch.meshgrid(torch.arange(0, rows, stride), torch.arange(cols), indexing="ij")
    d = torch.arange(min(rows, cols))
    r, c = torch.cat([r.reshape(-1), d]), torch.cat([c.reshape(-1), d])
    flat = c * rows + r if transposed else r * cols + c
    return flat.unique().to(dtype)  # sorted


def _mask(kind: str, rows: int, cols: int, density: float, dtype: torch.dtype, g: torch.Generator):
    """(flat offsets, stored shape) of a mask of this kind on a logical (rows, cols) weight."""
    n = rows * cols
    if kind == "rand":
        return _random_indices(n, density, dtype, g), (rows, cols)
    if kind in ("rows", "cols"):
        stride = max(1, round(1 / max(density, 1e-3)))
        shape = (cols, rows) if kind == "cols" else (rows, cols)
        return _struct_indices(rows, cols, stride, kind == "cols", dtype), shape
    if kind == "partial":  # struct's budget top-up: part of one more row
        stride = max(2, round(1 / max(density, 1e-3)))
        extra = (stride // 2) % rows * cols + torch.arange(max(1, cols // 3))
        flat = torch.cat([_struct_indices(rows, cols, stride, False, torch.int64), extra])
        return flat.unique().to(dtype), (rows, cols)
    if kind == "diagonal":
        d = torch.arange(min(rows, cols))
        return (d * cols + d).to(dtype), (rows, cols)
    if kind == "empty":
        return torch.zeros(0, dtype=dtype), (rows, cols)
    if kind == "one":
        return torch.tensor([int(torch.randint(n, (1,), generator=g))], dtype=dtype), (rows, cols)
    return torch.arange(n, dtype=dtype), (rows, cols)


def _assert_close_to_oracle(out, expected, a, b, idx, ncols) -> None:
    # fp32 accumulation error scales with sum_t |a||b|, not with the (possibly cancelling) result
    magnitude = sddmm_reference(a.abs(), b.abs(), idx, ncols)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    err = (out - expected).abs()
    assert torch.all(err <= RTOL * magnitude + 1e-30), err.max()


def _on(device: str, *tensors):
    return [t.to(device) for t in tensors]


def _run_path(path, a, b, idx, ncols, plan):
    device = "cpu" if path in CPU_ONLY else DEVICE
    a, b, idx = _on(device, a, b, idx)
    return masked_grad(a, b, idx, ncols, [p.to(device) for p in plan], path=path).cpu()


@st.composite
def masked_grad_cases(draw, max_t: int = 70):
    t = draw(st.integers(1, max_t))
    rows = draw(st.sampled_from([1, 2, 7, 33, 64, 70]))
    cols = draw(st.sampled_from([1, 3, 16, 48, 65, 130]))
    kind = draw(st.sampled_from(MASK_KINDS))
    density = draw(st.sampled_from([0.02, 0.1, 0.5]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    idx, (nrows, ncols) = _mask(kind, rows, cols, density, draw(INDEX_DTYPES), g)
    dtype_a = draw(st.sampled_from(FLOATS))
    dtype_b = dtype_a if draw(st.booleans()) else draw(st.sampled_from(FLOATS))
    a = torch.randn(t, nrows, generator=g).to(dtype_a)
    b = torch.randn(t, ncols, generator=g).to(dtype_b)
    if draw(st.booleans()):
        a = a.t().contiguous().t()  # column-major, as a transposed activation arrives
    if draw(st.booleans()):
        b = b[:, :]  # a view with the same strides; b column-major below
        b = b.t().contiguous().t() if draw(st.booleans()) else b
    # a plan that always tiles (min_nnz=0) covers the tile lists on small shapes too
    plan = mask_structure(idx, nrows, ncols, min_nnz=0) if draw(st.booleans()) else []
    return a, b, idx, ncols, plan


@pytest.mark.fuzz
@settings(max_examples=budget(100), deadline=None)
@given(masked_grad_cases())
def test_every_masked_grad_path_matches_the_reference(case):
    a, b, idx, ncols, plan = case
    expected = sddmm_reference(a, b, idx, ncols)
    for path in PATHS:
        _assert_close_to_oracle(_run_path(path, a, b, idx, ncols, plan), expected, a, b, idx, ncols)
    # and the path the cost model picks
    got = masked_grad(*_on(DEVICE, a, b, idx), ncols, [p.to(DEVICE) for p in plan]).cpu()
    _assert_close_to_oracle(got, expected, a, b, idx, ncols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowdot_and_plan_over_several_chunks_and_cpu_tiles(dtype):
    # T spans two whole chunks and a short one; the weight spans several CPU tiles and TILE
    # blocks, with struct rows, a partial row and scattered elements: every part of a plan
    g = torch.Generator().manual_seed(3)
    t, rows, cols = 2 * sddmm_cpp.CHUNK + 37, 300, 290
    idx = torch.cat([_struct_indices(rows, cols, 40, False, torch.int64),
                     torch.arange(400, dtype=torch.int64) * 211 + 11]).unique()
    a = torch.randn(t, rows, generator=g).to(dtype)
    b = torch.randn(t, cols, generator=g).to(dtype)
    plan = mask_structure(idx, rows, cols)
    p = _fields(plan)
    assert p["rows"].numel() == len(range(0, rows, 40)) and p["cols"].numel() == 0
    assert p["diag"].numel() == min(rows, cols) and p["rest"].numel() > 0
    expected = sddmm_reference(a, b, idx, cols)
    for p in (plan, []):
        for path in ("cpp_rowdot", "dense_bands", "sampled_addmm"):
            _assert_close_to_oracle(masked_grad(a, b, idx, cols, p, path=path), expected, a, b, idx, cols)
    _assert_close_to_oracle(sddmm_rowdot(a, b, idx, cols), expected, a, b, idx, cols)


def _fields(plan) -> dict:
    return dict(zip(STRUCTURE_FIELDS, plan, strict=True))


def _positions(plan, nrows, ncols):
    """The flat offset each position of cat(row block, col block, diagonals, rest) stands for."""
    p = _fields(plan)
    row_part = (p["rows"][:, None] * ncols + torch.arange(ncols)).reshape(-1)
    col_part = (torch.arange(nrows)[:, None] * ncols + p["cols"]).reshape(-1)
    return torch.cat([row_part, col_part, p["diag"], p["rest"].long()])


@pytest.mark.parametrize("kind, rows, cols", [("rows", 70, 90), ("cols", 90, 70), ("rand", 300, 260),
                                              ("diagonal", 130, 140), ("all", 5, 9), ("one", 1, 1)])
def test_plan_splits_dense_lines_and_orders_the_rest_tile_by_tile(kind, rows, cols):
    g = torch.Generator().manual_seed(4)
    idx, (nrows, ncols) = _mask(kind, rows, cols, 0.05, torch.int32, g)
    plan = mask_structure(idx, nrows, ncols, min_nnz=0)
    assert len(plan) == len(STRUCTURE_FIELDS)
    p = _fields(plan)
    assert p["perm"].dtype == torch.int64 and p["rest"].dtype == idx.dtype
    assert p["tile_ptr"].dtype == p["tile_ids"].dtype == torch.int32
    # the parts gathered by perm are the mask, in its order
    assert torch.equal(_positions(plan, nrows, ncols)[p["perm"]], idx.long())
    main_diagonal = torch.arange(min(nrows, ncols)) * (ncols + 1)
    if kind == "rows":  # struct: whole rows, the diagonal, nothing left
        assert torch.equal(p["rows"], torch.arange(0, nrows, round(1 / 0.05)))
        assert torch.equal(p["diag"], main_diagonal) and p["rest"].numel() == 0
    if kind == "cols":  # struct on a transposed layout: whole stored columns
        assert torch.equal(p["cols"], torch.arange(0, ncols, round(1 / 0.05)))
        assert torch.equal(p["diag"], main_diagonal) and p["rest"].numel() == 0
    if kind == "diagonal":
        assert torch.equal(p["diag"], main_diagonal) and p["rest"].numel() == 0
    if kind == "rand":
        assert p["rows"].numel() == p["cols"].numel() == p["diag"].numel() == 0
        assert p["rest"].numel() == idx.numel()
    if kind in ("all", "one"):  # every row is whole
        assert torch.equal(p["rows"], torch.arange(nrows)) and p["rest"].numel() == 0
    # each tile's run of the rest lies in that tile, sorted inside it; runs cover the rest
    rest, tile_ptr, tile_ids = p["rest"], p["tile_ptr"], p["tile_ids"]
    assert tile_ptr[0] == 0 and tile_ptr[-1] == rest.numel()
    assert torch.all(tile_ptr[1:] > tile_ptr[:-1])
    r, c = rest.long() // ncols, rest.long() % ncols
    tile = r // 64 * math.ceil(ncols / 64) + c // 64
    assert torch.equal(tile, torch.repeat_interleave(tile_ids.long(), (tile_ptr[1:] - tile_ptr[:-1]).long()))
    assert tile_ids.unique().numel() == tile_ids.numel()
    for start, end in zip(tile_ptr[:-1].tolist(), tile_ptr[1:].tolist(), strict=True):
        assert torch.all(rest[start + 1 : end] > rest[start : end - 1])


def test_plan_makes_dense_rows_of_a_partial_row_beside_struct_rows():
    # struct's budget top-up leaves part of one more row: a GEMM row, not a transpose of a and b
    idx = torch.cat([_struct_indices(200, 300, 50, False, torch.int64), 150 * 300 + torch.arange(40)])
    p = _fields(mask_structure(idx.unique(), 200, 300))
    assert p["rows"].tolist() == [0, 50, 100, 150] and p["rest"].numel() == 0


def test_plan_is_empty_without_structure_worth_using():
    g = torch.Generator().manual_seed(5)
    assert mask_structure(torch.zeros(0, dtype=torch.int32), 10, 10) == []
    small = _random_indices(300 * 300, 0.01, torch.int32, g)  # 900 scattered elements
    assert mask_structure(small, 300, 300) == []
    assert mask_structure(_random_indices(50 * 60, 0.2, torch.int64, g), 50, 60) == []  # one tile
    big = _random_indices(600 * 500, 0.05, torch.int32, g)
    assert len(mask_structure(big, 600, 500)) == len(STRUCTURE_FIELDS)  # tile order pays from 4096
    # dense lines are structure at any size
    assert len(mask_structure(torch.arange(0, 12, dtype=torch.int32), 3, 4)) == len(STRUCTURE_FIELDS)


def test_plan_rejects_unsorted_duplicated_or_out_of_range_indices():
    with pytest.raises(ValueError, match="sorted and unique"):
        mask_structure(torch.tensor([3, 1]), 2, 2)
    with pytest.raises(ValueError, match="sorted and unique"):
        mask_structure(torch.tensor([1, 1]), 2, 2)
    with pytest.raises(ValueError, match=r"in \[0, 4\) for a \(2, 2\) matrix, found \[0, 4\]"):
        mask_structure(torch.tensor([0, 4]), 2, 2)
    with pytest.raises(ValueError, match="int32 or int64 indices"):
        mask_structure(torch.tensor([0.0]), 2, 2)


def test_masked_grad_rejects_a_plan_or_path_that_does_not_fit():
    a, b, idx = torch.randn(4, 3), torch.randn(4, 5), torch.tensor([0, 7, 14])
    with pytest.raises(ValueError, match="path must be one of"):
        masked_grad(a, b, idx, 5, [], path="magic")
    with pytest.raises(ValueError, match="structure holds 7 tensors"):
        masked_grad(a, b, idx, 5, [idx])
    plan = mask_structure(torch.arange(15), 3, 5)
    with pytest.raises(ValueError, match="made for 15 indices, found 3"):
        masked_grad(a, b, idx, 5, plan)
    if not INTERPRETED and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            masked_grad(a, b, idx, 5, [], path="triton_tiles")


def test_cost_model_picks_by_shape_and_device():
    f32, bf16 = torch.float32, torch.bfloat16
    # CPU: sparse problems row-dot (tiny ones too, the C++ call costs microseconds); a few
    # elements on a big matrix gather; dense ones run banded GEMMs
    sparse = "cpp_rowdot" if sddmm_cpp.available() else "sampled_addmm"
    if sddmm_cpp.available():
        assert choose_path("cpu", f32, f32, 16, 64, 64, 40, None) == "cpp_rowdot"
    assert choose_path("cpu", f32, f32, 1024, 4096, 4096, 4096 * 41, 1024) == sparse
    # a few elements on a big matrix: gathering them beats transposing a and b
    assert choose_path("cpu", f32, f32, 1024, 4096, 4096, 300, 10) == "torch_gather"
    assert choose_path("cpu", bf16, bf16, 1024, 1024, 1024, 1024 * 512, 256) == "dense_bands"
    # CUDA: no tile lists without a plan; the tile kernel wherever tiles hold enough elements
    assert choose_path("cuda", bf16, bf16, 2048, 4096, 4096, 4096 * 41, None) == "triton_gather"
    assert choose_path("cuda", bf16, bf16, 2048, 4096, 4096, 4096 * 41, 4096) == "triton_tiles"
    assert choose_path("cuda", f32, f32, 2048, 4096, 4096, 4096, 4096) == "triton_gather"


def test_rowdot_unavailable_falls_back_to_sampled_addmm(monkeypatch):
    sddmm_cpp.available()  # built (or not) before the state is patched
    monkeypatch.setitem(sddmm_cpp._STATE, "rowdot", None)
    monkeypatch.setitem(sddmm_cpp._STATE, "diagonals", None)
    monkeypatch.setitem(sddmm_cpp._STATE, "error", "no compiler")
    assert not sddmm_cpp.available() and sddmm_cpp.unavailable_reason() == "no compiler"
    f32 = torch.float32
    assert choose_path("cpu", f32, f32, 1024, 4096, 4096, 4096 * 41, 1024) == "sampled_addmm"
    with pytest.raises(RuntimeError, match="unavailable: no compiler"):
        sddmm_rowdot(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 4]), 3)
    # the dispatcher still computes every part exactly, diagonals by column-slice dots
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(70, 64, generator=g), torch.randn(70, 80, generator=g)
    scattered = _random_indices(64 * 80, 0.05, torch.int64, g)
    idx = torch.cat([_struct_indices(64, 80, 20, False, torch.int64), scattered]).unique()
    plan = mask_structure(idx, 64, 80, min_nnz=0)
    _assert_close_to_oracle(masked_grad(a, b, idx, 80, plan), sddmm_reference(a, b, idx, 80), a, b, idx, 80)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation while fn runs (compiled code included)."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0], default=0)


@pytest.mark.parametrize("path, dtype", [
    ("cpp_rowdot", torch.float32), ("cpp_rowdot", torch.bfloat16), ("dense_bands", torch.bfloat16),
    ("sampled_addmm", torch.float32), (None, torch.float32)])
def test_masked_grad_makes_no_activation_sized_copy(path, dtype):
    # a and b hold T * 768 elements each; nothing but sampled_addmm (the baseline, which
    # transposes both in fp32) may allocate half of that in fp32: the banded GEMM holds a
    # (T, CPU_TILE) slice of a and a (CPU_TILE, 768) block, the C++ row-dot transposes chunks of
    # CHUNK steps into buffers of its own, bf16 GEMMs upcast (128, 768) chunks
    g = torch.Generator().manual_seed(6)
    t, rows, cols = 1024, 768, 768
    a, b = torch.randn(t, rows, generator=g).to(dtype), torch.randn(t, cols, generator=g).to(dtype)
    idx = torch.cat([_struct_indices(rows, cols, 300, False, torch.int64),
                     _random_indices(rows * cols, 0.01, torch.int64, g)]).unique()
    plan = mask_structure(idx, rows, cols)
    assert plan and _fields(plan)["rows"].numel() == 3
    sddmm_cpp.available()  # build before measuring
    out = masked_grad(a, b, idx, cols, plan, path=path)
    largest = _largest_allocation(lambda: masked_grad(a, b, idx, cols, plan, path=path))
    fp32_activation = a.numel() * 4
    if path == "sampled_addmm":
        assert largest >= fp32_activation  # the transposed copies the other paths avoid
    else:
        assert largest < fp32_activation // 2, (largest, fp32_activation)
    _assert_close_to_oracle(out, sddmm_reference(a, b, idx, cols), a, b, idx, cols)


def test_cpp_kernels_run_exactly_under_a_dispatch_mode():
    # memory trackers run training under a dispatch mode; the C++ kernels read the real tensors'
    # memory, beside the dispatcher, so they run there as anywhere
    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(300, 40, generator=g), torch.randn(300, 50, generator=g)
    idx = _random_indices(2000, 0.3, torch.int32, g)
    with Passthrough():
        out = masked_grad(a, b, idx, 50, [], path="cpp_rowdot")
        auto = masked_grad(a, b, idx, 50, [])
    for got in (out, auto):
        _assert_close_to_oracle(got, sddmm_reference(a, b, idx, 50), a, b, idx, 50)


@pytest.mark.fuzz
@settings(max_examples=budget(40), deadline=None)
@given(masked_grad_cases(max_t=150), st.sampled_from([1, 2, 3]))
def test_cpp_kernels_split_over_threads_match_the_reference(case, threads):
    # every element range a thread can get (the work threshold lowered so that small cases split),
    # diagonals with any elements: exact whatever the split
    a, b, idx, ncols, _ = case
    expected = sddmm_reference(a, b, idx, ncols)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sddmm_cpp, "_PARALLEL_WORK", 0)
            got = [sddmm_rowdot(a, b, idx, ncols), sddmm_diagonals(a, b, idx, ncols)]
    finally:
        torch.set_num_threads(before)
    for out in got:
        _assert_close_to_oracle(out, expected, a, b, idx, ncols)


def test_diagonal_kernel_streams_diagonals_of_every_offset():
    # the structure's diagonals one after another: main, above and below, on a wide matrix
    g = torch.Generator().manual_seed(8)
    t, rows, cols = 77, 40, 90
    r = torch.arange(rows)
    diag = torch.cat([r * cols + r, r[:30] * cols + r[:30] + 7, (r[5:] * cols + r[5:] - 5)])
    for dtype in FLOATS:
        a, b = torch.randn(t, rows, generator=g).to(dtype), torch.randn(t, cols, generator=g).to(dtype)
        _assert_close_to_oracle(sddmm_diagonals(a, b, diag, cols), sddmm_reference(a, b, diag, cols),
                                a, b, diag, cols)


def test_triton_kernels_sum_split_t_partials_deterministically():
    # few masked elements and a long T: the launchers split T across programs
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 9, generator=g), torch.randn(300, 7, generator=g)
    idx = _random_indices(63, 0.3, torch.int32, g)
    p = {k: v.to(DEVICE) for k, v in _fields(mask_structure(idx, 9, 7, min_fill=2.0, min_nnz=0)).items()}
    rows = torch.tensor([1, 4])
    calls = {
        "gather": lambda a, b, i: sddmm(a, b, i, 7),
        "tiles": lambda a, b, i: sddmm_tiles(a, b, p["rest"], 7, p["tile_ptr"], p["tile_ids"])[p["perm"]],
        "dense": lambda a, b, i: dense_block(a, b, rows=rows.to(a.device)).view(-1),
    }
    for name, call in calls.items():
        args = _on(DEVICE, a, b, idx)
        first, second = call(*args).cpu(), call(*args).cpu()
        assert torch.equal(first, second), name
        if name == "dense":
            expected = (a[:, rows].T @ b).view(-1)
            assert torch.allclose(first, expected, rtol=1e-5, atol=1e-5)
        else:
            _assert_close_to_oracle(first, sddmm_reference(a, b, idx, 7), a, b, idx, 7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "t, rows, cols, flat",
    [
        (5, 4, 3, []),  # nnz = 0
        (0, 4, 3, [0, 5, 11]),  # T = 0: an empty sum
        (1, 4, 3, [0, 5, 11]),
        (7, 1, 1, [0]),  # one element, a 1x1 matrix
        (66, 6, 5, [29]),  # the last element of the matrix
    ],
)
def test_masked_grad_edge_cases_match_dense_product(path, t, rows, cols, flat):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(t, rows, generator=g), torch.randn(t, cols, generator=g)
    idx = torch.tensor(flat, dtype=torch.int64)
    for plan in ([], mask_structure(idx, rows, cols, min_nnz=0)):
        out = _run_path(path, a, b, idx, cols, plan)
        _assert_close_to_oracle(out, (a.T @ b).view(-1)[idx], a, b, idx, cols)


@pytest.mark.parametrize("fn", [sddmm, sddmm_cpu])
def test_sddmm_edge_cases_match_dense_product(fn):
    g = torch.Generator().manual_seed(1)
    for t, rows, cols, flat in [(5, 4, 3, []), (0, 4, 3, [0, 5, 11]), (66, 6, 5, [29])]:
        device = DEVICE if fn is sddmm else "cpu"
        a, b = torch.randn(t, rows, generator=g), torch.randn(t, cols, generator=g)
        idx = torch.tensor(flat, dtype=torch.int64)
        out = fn(*_on(device, a, b, idx), cols).cpu()
        _assert_close_to_oracle(out, (a.T @ b).view(-1)[idx], a, b, idx, cols)


@pytest.mark.parametrize("fn", [sddmm, sddmm_cpu, lambda a, b, i, n: masked_grad(a, b, i, n, [])])
def test_sddmm_rejects_bad_shapes_naming_expected_and_found(fn):
    a, b = torch.randn(4, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"same T, found a \(4, 3\) and b \(5, 2\)"):
        fn(a, b, torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="ncols must equal b.shape"):
        fn(a, b[:4], torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="int32 or int64 indices"):
        fn(a, b[:4], torch.tensor([0.0]), 2)
    with pytest.raises(ValueError, match="fp32, bf16, fp16 or fp64, found torch.int32"):
        fn(a.int(), b[:4], torch.tensor([0]), 2)


def _interpreter_bf16(x: torch.Tensor) -> torch.Tensor:
    # triton 3.9's interpreter casts fp32 to bf16 by truncation, the GPU rounds to nearest even
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _expected_after_scatter(weights, indices, base, delta, scale):
    expected = [w.clone() for w in weights]
    scatter_fused_reference_(expected, indices, base, delta, scale)
    if INTERPRETED and delta is not None:
        for w, idx, b, d in zip(expected, indices, base, delta, strict=True):
            if w.dtype == torch.bfloat16:
                w.view(-1)[idx.long()] = _interpreter_bf16(b.float() + d.float() * scale)
    return expected


@st.composite
def scatter_cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    weights, indices, base, delta = [], [], [], []
    for _ in range(draw(st.integers(1, 4))):
        w_dtype = draw(st.sampled_from(FLOATS))
        w = torch.randn(draw(st.integers(1, 40)), draw(st.integers(1, 40)), generator=g).to(w_dtype)
        density = draw(st.sampled_from([0.02, 0.1, 0.5, 1.0]))
        idx = _random_indices(w.numel(), density, draw(INDEX_DTYPES), g)
        weights.append(w)
        indices.append(idx)
        # base differs from the weight's current values, so restoring is visible
        base.append(torch.randn(idx.shape[0], generator=g).to(w_dtype))
        d_dtype = draw(st.sampled_from([torch.float32, w_dtype]))
        delta.append(torch.randn(idx.shape[0], generator=g).to(d_dtype))
    scale = draw(st.sampled_from([1.0, 0.7, -2.5, 0.0]))
    return weights, indices, base, (None if draw(st.booleans()) else delta), scale


def _on_device(tensors):
    # always a copy, so the inputs stay as they were for the comparisons
    return None if tensors is None else [t.to(DEVICE, copy=True) for t in tensors]


@pytest.mark.fuzz
@settings(max_examples=budget(100, 10), deadline=None)
@given(scatter_cases())
def test_scatter_kernel_matches_reference_bit_exactly_and_touches_only_indices(case):
    weights, indices, base, delta, scale = case
    expected = _expected_after_scatter(weights, indices, base, delta, scale)
    out = _on_device(weights)
    scatter_fused_(out, _on_device(indices), _on_device(base), _on_device(delta), scale)
    for w, before, want, idx in zip(out, weights, expected, indices, strict=True):
        w = w.cpu()
        assert torch.equal(w, want)
        untouched = torch.ones(w.numel(), dtype=torch.bool)
        untouched[idx.long()] = False
        assert torch.equal(w.view(-1)[untouched], before.view(-1)[untouched])


@pytest.mark.fuzz
@settings(max_examples=budget(50, 10), deadline=None)
@given(scatter_cases())
def test_restore_after_activate_is_bit_exact(case):
    weights, indices, _, delta, scale = case
    original = _on_device(weights)
    out = _on_device(weights)
    indices = _on_device(indices)
    saved = [w.view(-1)[idx.long()].clone() for w, idx in zip(out, indices, strict=True)]
    if delta is not None:
        scatter_fused_(out, indices, saved, _on_device(delta), scale)
    scatter_fused_(out, indices, saved)
    assert all(torch.equal(w, o) for w, o in zip(out, original, strict=True))


def test_scatter_edge_cases_empty_single_and_last_element():
    weights = [torch.zeros(3, 4), torch.zeros(2, 2), torch.zeros(5, 1)]
    indices = [torch.tensor([], dtype=torch.int64), torch.tensor([3]), torch.tensor([0, 4])]
    base = [torch.tensor([]), torch.tensor([1.5]), torch.tensor([2.0, 3.0])]
    delta = [torch.tensor([]), torch.tensor([0.25]), torch.tensor([1.0, -1.0])]
    out = _on_device(weights)
    scatter_fused_(out, _on_device(indices), _on_device(base), _on_device(delta), 2.0)
    assert torch.equal(out[0].cpu(), torch.zeros(3, 4))
    assert torch.equal(out[1].cpu(), torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(out[2].cpu(), torch.tensor([[4.0], [0.0], [0.0], [0.0], [1.0]]))
    scatter_fused_([], [], [])


def test_scatter_covers_layers_spanning_many_programs():
    # 3500 and 2049 elements: several 1024-element programs per layer, ragged last ones
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(shape, generator=g) for shape in [(70, 50), (3, 3), (1, 2049)]]
    indices = [torch.arange(w.numel()) for w in weights]
    base = [torch.randn(len(i), generator=g) for i in indices]
    delta = [torch.randn(len(i), generator=g) for i in indices]
    expected = _expected_after_scatter(weights, indices, base, delta, 0.5)
    out = _on_device(weights)
    scatter_fused_(out, _on_device(indices), _on_device(base), _on_device(delta), 0.5)
    assert all(torch.equal(w.cpu(), e) for w, e in zip(out, expected, strict=True))


def test_scatter_launches_once_per_dtype_group(monkeypatch):
    launches = []
    kernel = scatter._scatter_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(scatter, "_scatter_kernel", CountingKernel())
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    weights = [torch.zeros(8, 8 + i, dtype=dt, device=DEVICE) for i, dt in enumerate(dtypes)]
    indices = [torch.arange(0, w.numel(), 3, device=DEVICE) for w in weights]
    base = [torch.ones_like(i, dtype=w.dtype) for i, w in zip(indices, weights, strict=True)]
    scatter_fused_(weights, indices, base)
    assert len(launches) == 2
    for w, i, b in zip(weights, indices, base, strict=True):
        assert torch.equal(w.view(-1)[i], b)


@pytest.mark.parametrize("fn", [scatter_fused_, scatter_fused_reference_])
def test_scatter_rejects_bad_layers_naming_position_and_shapes(fn):
    w, idx, base = torch.zeros(4, 4), torch.tensor([1, 2]), torch.zeros(2)
    with pytest.raises(ValueError, match="found 2 weights, 1 indices, 2 base"):
        fn([w, w], [idx], [base, base])
    with pytest.raises(ValueError, match=r"base\[1\] must have shape \(2,\) on cpu, found \(3,\)"):
        fn([w, w], [idx, idx], [base, torch.zeros(3)])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a contiguous"):
        fn([w.t()], [idx], [base])
    with pytest.raises(ValueError, match=r"delta\[0\] must have shape \(2,\)"):
        fn([w], [idx], [base], [torch.zeros(5)])
    with pytest.raises(ValueError, match=r"base\[0\] must be fp32/bf16/fp16, found torch.int32"):
        fn([w], [idx], [base.int()])


@pytest.mark.parametrize(("weight_dtype", "base_dtype"), [(torch.bfloat16, torch.float32),
                                                          (torch.float32, torch.bfloat16)])
def test_scatter_takes_the_base_at_another_precision_with_one_rounding(weight_dtype, base_dtype):
    """A cast model keeps its saved base at the weights' original precision: the write rounds
    base + delta into the weight's dtype once, on both paths."""
    g = torch.Generator().manual_seed(7)
    idx = torch.randperm(96, generator=g)[:40].sort().values.to(torch.int32)
    base = torch.randn(40, generator=g).to(base_dtype)
    delta = torch.randn(40, generator=g) * 1e-3
    want = (base.float() + delta).to(weight_dtype)
    for fn in (scatter_fused_reference_, scatter_fused_):
        truncates = fn is scatter_fused_ and INTERPRETED and weight_dtype == torch.bfloat16
        w = torch.zeros(8, 12, dtype=weight_dtype, device=DEVICE)
        for deltas, expected in (([delta.to(DEVICE)], want), (None, base.to(weight_dtype))):  # write, restore
            fn([w], [idx.to(DEVICE)], [base.to(DEVICE)], deltas)
            got = w.view(-1)[idx.long().to(DEVICE)].cpu()
            if truncates:  # triton 3.9's interpreter truncates to bf16 instead of rounding
                torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=0)
            else:
                assert torch.equal(got, expected), fn.__name__
