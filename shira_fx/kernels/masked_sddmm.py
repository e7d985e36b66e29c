"""The masked gradient's dispatcher, `masked_sddmm`: fp32 `(a.T @ b).view(-1)[indices]` by the
mask's structure (`structure.mask_structure`: dense rows and columns as GEMMs, diagonals as
column-slice dots) and, for the rest, the fastest exact SDDMM path for the device and shape,
picked by a cost model (`choose_path`), unless the caller names one. The CPU paths that are
plain torch live here; the Triton kernels and the Inductor row-dot in their own files.
"""

import math

import torch
from torch import Tensor

from . import sddmm_inductor
from .sddmm import (
    _INTERPRETED,
    TILE,
    check_args,
    dense_block,
    sddmm,
    sddmm_cpu,
    sddmm_tiles,
)
from .structure import CPU_TILE, STRUCTURE_FIELDS, mask_structure

CPU_PATHS = ("inductor_rowdot", "sampled_addmm", "dense_bands", "torch_gather")
TRITON_PATHS = ("triton_gather", "triton_tiles")
PATHS = CPU_PATHS + TRITON_PATHS

# CPU cost model: rough rates per second, calibrated with bench/kernel_ops.py (bench/RESULTS.md);
# only their ratios matter, the path with the smallest estimate wins.
_CPU_ROWDOT_MACS = 6e9  # Inductor row-dot, per masked element and step of T
_CPU_SAMPLED_MACS = 2e9  # sampled_addmm, the same
_CPU_GEMM_MACS = 2.5e10  # torch.mm over whole row bands
_CPU_TRANSPOSE = 3e8  # elements of a and b transposed into chunk buffers (from memory)
_CPU_GATHER = 2e8  # elements gathered from columns of a and b by index_select
_CPU_CALL = 1e-4  # seconds per compiled row-dot call (one per chunk of T)
_TINY_WORK = 1 << 18  # masked elements x T below which plain gathers win (and nothing compiles)
# CUDA cost model, not yet calibrated on a GPU (bench/gpu.py measures every path and reports
# where this pick was not the fastest): tile-kernel FLOP/s by dot dtype (fp32: IEEE, no tensor
# cores), gather-dot bytes/s of gathered reads.
_GPU_TILE_FLOPS = {torch.float32: 2e13, torch.bfloat16: 3e14, torch.float16: 3e14}
_GPU_GATHER_BYTES = 1e12
_UPCAST_CHUNK = 128
# elements of the temporaries a streamed part (diagonals, gathers) holds at a time
_STREAM_ELEMS = 1 << 18


def _diagonals(a: Tensor, b: Tensor, diag: Tensor, ncols: int) -> Tensor:
    """fp32 values at the structure's `diag` offsets (whole diagonals, one after another): per
    diagonal c = r + delta, `sum_t a[t, r0:r1] * b[t, r0 + delta:r1 + delta]`, streamed over T
    in chunks whose products stay small; no gathers, no transposes."""
    f = diag.long().cpu()
    r = f // ncols
    deltas, lengths = torch.unique_consecutive(f - r * ncols - r, return_counts=True)
    parts, start = [], 0
    for d, n in zip(deltas.tolist(), lengths.tolist(), strict=True):
        r0 = int(r[start])
        x, y = a[:, r0 : r0 + n], b[:, r0 + d : r0 + d + n]
        acc = torch.zeros(n, dtype=torch.float32, device=a.device)
        step = max(1, _STREAM_ELEMS // n)
        for t0 in range(0, a.shape[0], step):
            acc += torch.linalg.vecdot(x[t0 : t0 + step].float(), y[t0 : t0 + step].float(), dim=0)
        parts.append(acc)
        start += n
    return torch.cat(parts)


def _mm_t(x: Tensor, y: Tensor) -> Tensor:
    """fp32 `x.T @ y` by torch.mm, for (T, I) x and (T, J) y; other dtypes are upcast a chunk
    of T at a time (CPU matmul has no fp32 output for bf16/fp16 inputs)."""
    if x.dtype == torch.float32 and y.dtype == torch.float32:
        return torch.mm(x.t(), y)
    out = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
    for t0 in range(0, x.shape[0], _UPCAST_CHUNK):
        out.addmm_(x[t0 : t0 + _UPCAST_CHUNK].float().t(), y[t0 : t0 + _UPCAST_CHUNK].float())
    return out


def _dense_bands(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """Elements grouped by bands of CPU_TILE rows (sorted or structure order): one GEMM per band
    that holds any, `a[:, band].T @ b`, then the band's elements picked out of it. Exact and
    fast for dense masks; memory O(CPU_TILE * ncols), never the whole product."""
    f = flat.long()
    band_ids, counts = torch.unique_consecutive(f // (CPU_TILE * ncols), return_counts=True)
    out = torch.empty(f.shape[0], dtype=torch.float32, device=a.device)
    start = 0
    for band, n in zip(band_ids.tolist(), counts.tolist(), strict=True):
        r0 = band * CPU_TILE
        block = _mm_t(a[:, r0 : r0 + CPU_TILE], b)
        out[start : start + n] = block.view(-1)[f[start : start + n] - r0 * ncols]
        start += n
    return out


def _torch_gather(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """Plain gathers and fp32 vecdots, a block of elements at a time (bounded temporaries): for
    problems too small, or elements too few, for transposing a and b to pay."""
    f = flat.long()
    rows = f // ncols
    cols = f - rows * ncols
    out = torch.empty(f.shape[0], dtype=torch.float32, device=a.device)
    step = max(1, _STREAM_ELEMS // max(1, a.shape[0]))
    for s in range(0, f.shape[0], step):
        x = a.index_select(1, rows[s : s + step]).float()
        y = b.index_select(1, cols[s : s + step]).float()
        out[s : s + step] = torch.linalg.vecdot(x, y, dim=0)
    return out


def _sampled_addmm(a: Tensor, b: Tensor, flat: Tensor, ncols: int) -> Tensor:
    """`sddmm_cpu` for any order of `flat` (it needs sorted offsets)."""
    if flat.shape[0] < 2 or bool(torch.all(flat[1:] > flat[:-1])):
        return sddmm_cpu(a, b, flat, ncols)
    sorted_flat, order = torch.sort(flat)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=a.device)
    out[order] = sddmm_cpu(a, b, sorted_flat, ncols)
    return out


def choose_path(
    device: str | torch.device, dtype_a: torch.dtype, dtype_b: torch.dtype, T: int, A: int, B: int,
    m: int, n_tiles: int | None,
) -> str:
    """The path the cost model picks for the m remaining elements of a (T, A) by (T, B) masked
    gradient on `device`; `n_tiles` is the number of TILE blocks holding them (None without a
    structure: the Triton tile kernel needs its tile lists)."""
    if torch.device(device).type == "cuda":
        if n_tiles is None:
            return "triton_gather"
        dot_dtype = torch.promote_types(dtype_a, dtype_b)
        tiles = 2 * n_tiles * TILE * TILE * T / _GPU_TILE_FLOPS.get(dot_dtype, _GPU_TILE_FLOPS[torch.float32])
        size = torch.finfo(dtype_a).bits // 8 + torch.finfo(dtype_b).bits // 8
        gather = m * T * size / _GPU_GATHER_BYTES
        return "triton_tiles" if tiles < gather else "triton_gather"
    if m * T <= _TINY_WORK:
        return "torch_gather"
    costs = cpu_path_seconds(T, A, B, m)
    return min(costs, key=costs.get)


def cpu_path_seconds(T: int, A: int, B: int, m: int) -> dict[str, float]:
    """The CPU cost model's estimate, in seconds, of each path for m masked elements of a
    (T, A) by (T, B) gradient (the row-dot where Inductor is available, else sampled_addmm):
    what `choose_path` compares, and what the convolution's cost model sums per kernel offset."""
    work = m * T
    rowdot = sddmm_inductor.available()
    return {
        "torch_gather": 2 * work / _CPU_GATHER,
        "dense_bands": min(math.ceil(A / CPU_TILE), m) * CPU_TILE * B * T / _CPU_GEMM_MACS,
        "inductor_rowdot" if rowdot else "sampled_addmm": (
            work / (_CPU_ROWDOT_MACS if rowdot else _CPU_SAMPLED_MACS) + T * (A + B) / _CPU_TRANSPOSE
            + math.ceil(T / sddmm_inductor.CHUNK) * _CPU_CALL),
    }


def _remaining(a: Tensor, b: Tensor, flat: Tensor, ncols: int, tiles: tuple[Tensor, Tensor] | None,
               path: str) -> Tensor:
    if path == "triton_gather":
        return sddmm(a, b, flat, ncols)
    if path == "triton_tiles":
        assert tiles is not None
        return sddmm_tiles(a, b, flat, ncols, *tiles)
    if path == "inductor_rowdot":
        return sddmm_inductor.sddmm_rowdot(a, b, flat, ncols)
    if path == "sampled_addmm":
        return _sampled_addmm(a, b, flat, ncols)
    if path == "dense_bands":
        return _dense_bands(a, b, flat, ncols)
    return _torch_gather(a, b, flat, ncols)


def _check_path(path: str | None, a: Tensor) -> None:
    if path is None:
        return
    if path not in PATHS:
        raise ValueError(f"masked_sddmm: path must be one of {PATHS}, found {path!r}")
    if path in TRITON_PATHS and not a.is_cuda and not _INTERPRETED:
        raise ValueError(f"masked_sddmm: path {path!r} needs CUDA tensors (or TRITON_INTERPRET=1)")
    if path in CPU_PATHS and a.is_cuda and path not in ("dense_bands", "torch_gather"):
        raise ValueError(f"masked_sddmm: path {path!r} runs on CPU only, found {a.device}")


def masked_sddmm(
    a: Tensor, b: Tensor, indices: Tensor, ncols: int, structure: list[Tensor], *, path: str | None = None
) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` for a (T, A), b (T, B), sorted unique `indices`,
    never forming the A×B product: the kernel dispatcher of the `shira_fx::masked_grad` op.

    `structure` is `mask_structure(indices, A, ncols)` (or `[]`): dense rows and columns run as
    GEMMs, the rest by the path the cost model picks for the device and shape, unless `path`
    (one of PATHS) says which. Exact for every path: fp32 accumulation, any of fp32/bf16/fp16
    inputs, read through their strides (no transposed copies of a or b).
    """
    check_args("masked_sddmm", a, b, indices, ncols)
    _check_path(path, a)
    nnz, T = indices.shape[0], a.shape[0]
    if structure and len(structure) != len(STRUCTURE_FIELDS):
        raise ValueError(f"masked_sddmm: a structure holds {len(STRUCTURE_FIELDS)} tensors "
                         f"{STRUCTURE_FIELDS} (mask_structure), found {len(structure)}")
    if structure and structure[STRUCTURE_FIELDS.index("perm")].numel() == 0:
        structure = []  # no_structure(): a layer without one, kept the same arity as its neighbours
    made_for = structure[STRUCTURE_FIELDS.index("perm")].shape[0] if structure else nnz
    if made_for != nnz:
        raise ValueError(f"masked_sddmm: the structure was made for {made_for} indices, found {nnz}")
    if nnz == 0 or T == 0:
        return torch.zeros(nnz, dtype=torch.float32, device=a.device)
    if not structure and path == "triton_tiles":  # tile lists, without dense parts
        structure = mask_structure(indices, a.shape[1], ncols, min_fill=2.0, min_nnz=0)
    if structure:
        rows, cols, diag, rest, perm, tile_ptr, tile_ids = structure
        tiles = (tile_ptr, tile_ids)
    else:
        rows = cols = diag = None
        rest, perm, tiles = indices, None, None
    chosen = path or choose_path(a.device, a.dtype, b.dtype, T, a.shape[1], b.shape[1], rest.shape[0],
                                 None if tiles is None else tiles[1].shape[0])
    on_triton = chosen in TRITON_PATHS
    parts = []
    if rows is not None and rows.numel():
        block = dense_block(a, b, rows=rows) if on_triton else _mm_t(a.index_select(1, rows), b)
        parts.append(block.view(-1))
    if cols is not None and cols.numel():
        block = dense_block(a, b, cols=cols) if on_triton else _mm_t(a, b.index_select(1, cols))
        parts.append(block.view(-1))
    if diag is not None and diag.numel():
        # coalesced reads for the gather kernel; column slices streamed on CPU
        parts.append(sddmm(a, b, diag, ncols) if on_triton or a.is_cuda else _diagonals(a, b, diag, ncols))
    if rest.numel():
        parts.append(_remaining(a, b, rest, ncols, tiles, chosen))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if perm is None else out[perm]
