"""Fused in-place scatter over many layers: `W.flat[idx] = base + scale * delta`.

Switching adapters and syncing fused weights touch only the masked elements of every
targeted layer. On CUDA one kernel launch covers all layers that share a device and dtypes,
reading per-layer data pointers from a table; on the CPU the layers are split across a
thread pool (`scatter_layers_` picks).
"""

import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

_BLOCK = 1024
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.int32: tl.int32,
    torch.int64: tl.int64,
}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# per-layer record in the layer table: weight, indices, base, delta pointers, then nnz
_RECORD = 5


@triton.jit
def _scatter_kernel(
    layer_table, program_table, scale,
    W_DTYPE: tl.constexpr, IDX_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr, DELTA_DTYPE: tl.constexpr,
    HAS_DELTA: tl.constexpr, RECORD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.load(program_table + 2 * pid)
    start = tl.load(program_table + 2 * pid + 1)
    record = layer_table + RECORD * layer
    w_ptr = tl.load(record).to(tl.pointer_type(W_DTYPE))
    idx_ptr = tl.load(record + 1).to(tl.pointer_type(IDX_DTYPE))
    base_ptr = tl.load(record + 2).to(tl.pointer_type(BASE_DTYPE))
    nnz = tl.load(record + 4)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < nnz
    idx = tl.load(idx_ptr + offs, mask=mask)
    val = tl.load(base_ptr + offs, mask=mask)
    if HAS_DELTA:
        delta_ptr = tl.load(record + 3).to(tl.pointer_type(DELTA_DTYPE))
        delta = tl.load(delta_ptr + offs, mask=mask).to(tl.float32)
        val = val.to(tl.float32) + delta * scale
    # one rounding into the weight's dtype, to nearest even as torch does (triton 3.9's
    # interpreter truncates to bf16)
    tl.store(w_ptr + idx, val.to(W_DTYPE), mask=mask)


# The table holds raw addresses: the interpreter follows them in host memory, which is
# right for CPU tensors only (it copies tensor arguments to the host, not what they point to).
_INTERPRETED = isinstance(_scatter_kernel, InterpretedFunction)


def _check_layers(
    name: str, weights: list[Tensor], indices: list[Tensor], base: list[Tensor],
    delta: list[Tensor] | None,
) -> None:
    counts = [len(weights), len(indices), len(base)] + ([] if delta is None else [len(delta)])
    if len(set(counts)) != 1:
        found = f"{len(weights)} weights, {len(indices)} indices, {len(base)} base"
        found += "" if delta is None else f", {len(delta)} delta"
        raise ValueError(f"{name}: expected one entry per layer in every list, found {found}")
    for i, (w, idx, b) in enumerate(zip(weights, indices, base, strict=True)):
        if w.dtype not in _WEIGHT_DTYPES or not w.is_contiguous():
            raise ValueError(
                f"{name}: weights[{i}] must be a contiguous fp32/bf16/fp16 tensor, "
                f"found dtype {w.dtype} strides {w.stride()}"
            )
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name}: indices[{i}] must be 1-D int32 or int64, "
                f"found shape {tuple(idx.shape)} dtype {idx.dtype}"
            )
        others = [("base", b)] + ([] if delta is None else [("delta", delta[i])])
        for label, t in others:
            if t.shape != idx.shape or t.device != w.device:
                raise ValueError(
                    f"{name}: {label}[{i}] must have shape {tuple(idx.shape)} on {w.device}, "
                    f"found {tuple(t.shape)} on {t.device}"
                )
        if b.dtype not in _WEIGHT_DTYPES:  # the weight's, or wider (kept at its original precision)
            raise ValueError(f"{name}: base[{i}] must be fp32/bf16/fp16, found {b.dtype}")
        if delta is not None and delta[i].dtype not in _WEIGHT_DTYPES:
            raise ValueError(
                f"{name}: delta[{i}] must be fp32/bf16/fp16, found {delta[i].dtype}"
            )


def _launch_group(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor],
    delta: list[Tensor] | None, scale: float,
) -> None:
    device = weights[0].device
    if _INTERPRETED and device.type != "cpu":
        raise RuntimeError(
            f"scatter_fused_: under TRITON_INTERPRET=1 the weights must be on cpu, found {device}"
        )
    # the table holds bare addresses: these tensors stay referenced through the launch (the
    # caching allocator reuses their memory only after it, in stream order)
    indices = [t.contiguous() for t in indices]
    base = [t.contiguous() for t in base]
    delta = None if delta is None else [t.contiguous() for t in delta]
    nnz = [t.shape[0] for t in indices]
    records = [
        [w.data_ptr(), i.data_ptr(), b.data_ptr(), 0 if delta is None else delta[k].data_ptr(), n]
        for k, (w, i, b, n) in enumerate(zip(weights, indices, base, nnz, strict=True))
    ]
    blocks = torch.tensor([triton.cdiv(n, _BLOCK) for n in nnz])
    n_programs = int(blocks.sum())
    if n_programs == 0:
        return
    # program p handles elements [start, start + BLOCK) of layer layer_of[p]
    layer_of = torch.repeat_interleave(torch.arange(len(weights)), blocks)
    first_program = torch.cumsum(blocks, 0) - blocks
    start = (torch.arange(n_programs) - first_program[layer_of]) * _BLOCK
    layer_table = torch.tensor(records, dtype=torch.int64).to(device)
    program_table = torch.stack([layer_of, start], dim=1).to(device)
    delta_dtype = base[0].dtype if delta is None else delta[0].dtype
    with torch.cuda.device(device.index if device.type == "cuda" else -1):
        _scatter_kernel[(n_programs,)](
            layer_table, program_table, float(scale),
            W_DTYPE=_TL_DTYPES[weights[0].dtype], IDX_DTYPE=_TL_DTYPES[indices[0].dtype],
            BASE_DTYPE=_TL_DTYPES[base[0].dtype], DELTA_DTYPE=_TL_DTYPES[delta_dtype],
            HAS_DELTA=delta is not None,
            RECORD=_RECORD, BLOCK=_BLOCK,
            # no mul+add contraction into an fma: results match the torch path bit for bit
            enable_fp_fusion=False,
        )


def scatter_fused_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor],
    delta: list[Tensor] | None = None, scale: float = 1.0,
) -> None:
    """In place, per layer: `weights[i].view(-1)[indices[i]] = base[i] + scale * delta[i]`.

    One Triton launch per (device, weight, index, delta dtype) group; `delta=None` restores `base`.
    """
    _check_layers("scatter_fused_", weights, indices, base, delta)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        d_dtype = None if delta is None else delta[i].dtype
        groups[(w.device, w.dtype, indices[i].dtype, base[i].dtype, d_dtype)].append(i)
    for layers in groups.values():
        _launch_group(
            [weights[i] for i in layers], [indices[i] for i in layers], [base[i] for i in layers],
            None if delta is None else [delta[i] for i in layers], scale,
        )


@torch.no_grad()
def scatter_fused_reference_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor],
    delta: list[Tensor] | None = None, scale: float = 1.0,
) -> None:
    """In place, per layer: `weights[i].view(-1)[indices[i]] = base[i] + scale * delta[i]`.

    The CPU path and the test oracle: one `index_copy_` per layer, sums in fp32, no weight copy.
    """
    _check_layers("scatter_fused_reference_", weights, indices, base, delta)
    for i, (w, idx, b) in enumerate(zip(weights, indices, base, strict=True)):
        src = b.to(w.dtype) if delta is None else (b.float() + delta[i].float() * scale).to(w.dtype)
        # index_copy_ needs int64 indices; casting them is faster than index_put_ with int32
        w.view(-1).index_copy_(0, idx.long(), src)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
# below this many elements in all, one thread scatters them faster than handing them out
_MIN_THREADED = 65536


def _pool(threads: int) -> ThreadPoolExecutor:
    """The shared scatter pool, created under a lock: banks and adapters in several threads
    may scatter at once (each into its own weights). A pool that is outgrown is left running,
    not shut down, since another thread may be submitting to it; it only grows, so at most a
    few idle threads are left behind."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads:
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="shira_fx-scatter")
        return _POOL


def _balanced_groups(sizes: list[int], n: int) -> list[list[int]]:
    """Split layer positions into n groups of about equal element counts (largest first)."""
    groups: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        g = load.index(min(load))
        groups[g].append(i)
        load[g] += sizes[i]
    return [sorted(g) for g in groups if g]


def _scatter_cpu(weights, indices, base, delta, scale) -> None:
    """The CPU scatter: layers split across threads. Scattered writes are bound by memory
    latency, not bandwidth, so two threads keep twice the misses in flight; the GIL is
    released inside index_copy_, and each layer belongs to one thread."""
    threads = min(torch.get_num_threads(), len(weights))
    if threads < 2 or sum(i.numel() for i in indices) < _MIN_THREADED:
        scatter_fused_reference_(weights, indices, base, delta, scale)
        return
    pool = _pool(threads)

    @torch.no_grad()
    def run(group: list[int]) -> None:
        pick = lambda xs: [xs[i] for i in group]
        scatter_fused_reference_(pick(weights), pick(indices), pick(base),
                                 None if delta is None else pick(delta), scale)

    groups = _balanced_groups([i.numel() for i in indices], threads)
    futures = [pool.submit(run, g) for g in groups[1:]]
    run(groups[0])
    for f in futures:
        f.result()


def scatter_layers_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor] | None,
    scale: float = 1.0,
) -> None:
    """In place, per layer: `W.flat[idx] = base + scale * delta` (or `base` when delta is None):
    the fused Triton launch on CUDA, the threaded `index_copy_` on the CPU (the dispatcher of
    the `shira_fx::scatter_` op)."""
    if not weights:
        return
    if weights[0].is_cuda:
        scatter_fused_(weights, indices, base, delta, scale)
    else:
        _scatter_cpu(weights, indices, base, delta, scale)
