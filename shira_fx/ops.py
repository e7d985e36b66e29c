"""torch.library custom ops: the functional training op and the mutating scatter op.

Two kinds of op: autograd cannot be registered on a mutating op, so
training goes through the functional `sparse_linear` (forward: the dense linear on the fused
weight; backward: grad_x plus the masked gradient through `masked_grad`), while syncing and
switching go through the mutating `scatter_`, always outside autograd. Each op runs the Triton
kernel on CUDA and a torch implementation on CPU.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .kernels import (
    scatter_fused_,
    scatter_fused_reference_,
    side_backward_x,
    side_backward_x_segmented,
    side_forward,
    side_forward_segmented,
)


def _dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """The layer's own linear, computed in x's dtype (under autocast x arrives already cast;
    the weight is cast here, so backward keeps the weight itself, not a cast copy)."""
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if not transposed:
        return F.linear(x, weight, bias)
    y = x.reshape(-1, x.shape[-1]) @ weight
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[1])


@torch.library.custom_op("shira_fx::masked_grad", mutates_args=())
def masked_grad(a: Tensor, b: Tensor, indices: Tensor, ncols: int, plan: list[Tensor]) -> Tensor:
    """fp32 `(a.T @ b).view(-1)[indices]` for 2-D a (T, A), b (T, B), never forming A×B: the
    mask's structure (`plan`, from `kernels.plan_mask`; empty for none) as dense GEMMs, the
    rest by the fastest exact path for the device and shape (`kernels.masked_grad`)."""
    return kernels.masked_grad(a, b, indices, ncols, plan)


@masked_grad.register_fake
def _(a: Tensor, b: Tensor, indices: Tensor, ncols: int, plan: list[Tensor]) -> Tensor:
    return a.new_empty(indices.shape[0], dtype=torch.float32)


@torch.library.custom_op("shira_fx::sparse_linear", mutates_args=())
def sparse_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, indices: Tensor, transposed: bool,
    plan: list[Tensor],
) -> Tensor:
    """The dense linear on the fused weight; `values` is an input only so it receives a gradient.

    `weight` holds base + values at `indices` (kept so by `SparseAdapter.sync`), so the forward
    costs exactly what the base model's linear costs. `transposed` marks a weight stored
    (in, out), as GPT-2's Conv1D stores it; `plan` is the mask's structure for the backward.
    """
    return _dense_linear(x, weight, bias, transposed)


@sparse_linear.register_fake
def _(x, weight, bias, values, indices, transposed, plan):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty(*x.shape[:-1], out_features)


def _autocast_kernel(device_type: str):
    """Autocast for `sparse_linear`: x is cast to the autocast dtype of the moment (bf16 or
    fp16, whichever the user's autocast region asks for), the weight stays as it is (the op
    casts it), and the values stay fp32 so their gradient is accumulated in fp32."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset, x, weight, bias, values, indices, transposed, plan):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            if x.is_floating_point() and x.device.type == device_type and x.dtype != dtype:
                x = x.to(dtype)
            return torch.ops.shira_fx.sparse_linear.default(x, weight, bias, values, indices, transposed,
                                                            plan)

    return kernel


_LIB = torch.library.Library("shira_fx", "IMPL")
for _device_type in ("cpu", "cuda"):
    _LIB.impl("sparse_linear", _autocast_kernel(_device_type),
              "Autocast" + torch._C._dispatch_key_for_device(_device_type), with_keyset=True)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, values, indices, transposed, plan = inputs
    ctx.save_for_backward(x, weight, indices, *plan)
    ctx.transposed = transposed
    ctx.values_dtype = values.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y: Tensor):
    x, weight, indices, *plan = ctx.saved_tensors
    needs_x, _, needs_bias, needs_values = ctx.needs_input_grad[:4]
    out_features = grad_y.shape[-1]
    gy = grad_y.reshape(-1, out_features)
    grad_x = grad_bias = grad_values = None
    if needs_x:
        # grad_x = grad_y @ W for (out, in) storage, grad_y @ W.T for (in, out) storage
        w = (weight.t() if ctx.transposed else weight).to(gy.dtype)
        grad_x = (gy @ w).reshape(x.shape).to(x.dtype)
    if needs_values:
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.transposed:
            grad_values = masked_grad(x2, gy, indices, out_features, plan)
        else:
            grad_values = masked_grad(gy, x2, indices, x2.shape[1], plan)
        grad_values = grad_values.to(ctx.values_dtype)
    if needs_bias and ctx.bias_dtype is not None:
        grad_bias = gy.sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_bias, grad_values, None, None, [None] * len(plan)


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


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
    if threads < 2 or sum(i.numel() for i in indices) < 65536:
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


def scatter_weights_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor] | None,
    scale: float = 1.0,
) -> None:
    """`W.flat[idx] = base + scale * delta` (or `base`) for every layer, in place. Eagerly this
    calls the implementation directly (the dispatcher's cost over many layers' tensors is
    noticeable); under torch.compile it is the registered mutating op, so Inductor sees the
    mutation."""
    if torch.compiler.is_compiling():
        torch.ops.shira_fx.scatter_(weights, indices, base, delta or [], scale)
    else:
        _scatter_impl(weights, indices, base, delta or None, scale)


def _scatter_impl(weights, indices, base, delta, scale) -> None:
    if not weights:
        return
    if weights[0].is_cuda:
        scatter_fused_(weights, indices, base, delta, scale)
    else:
        _scatter_cpu(weights, indices, base, delta, scale)


@torch.library.custom_op("shira_fx::scatter_", mutates_args=("weights",))
def scatter_(
    weights: list[Tensor], indices: list[Tensor], base: list[Tensor], delta: list[Tensor], scale: float
) -> None:
    """In place, per layer: `W.flat[idx] = base + scale * delta` (or `base` when delta is empty).

    Assigns rather than accumulates, so the fused weights never drift from `base + values`,
    and restoring the saved base values is bit-exact. Touches only the indexed elements.
    """
    _scatter_impl(weights, indices, base, delta or None, scale)


@scatter_.register_fake
def _(weights, indices, base, delta, scale) -> None:
    return None


# on the CPU a sparse side product (a quantized layer's adapter, a mixed batch's rows) runs as a
# GEMM on the delta written out densely when the sparse kernel would cost more than writing it:
# tokens * nnz multiply-adds against out * in written elements, a multiply-add through the
# sparse kernel costing about half a written element (measured at 512x512..2048x2048,
# 1.5-6 % density, 128-256 tokens)
DENSE_COPY_TOKENS_X_NNZ = 2.0


def _dense_is_cheaper(tokens: int, nnz: int, numel: int) -> bool:
    return nnz > 0 and tokens * nnz >= DENSE_COPY_TOKENS_X_NNZ * numel


@torch.library.custom_op("shira_fx::side_linear", mutates_args=())
def side_linear(x: Tensor, values: Tensor, indices: Tensor, out_features: int, in_features: int) -> Tensor:
    """`x @ S.T` for the sparse delta S (`S.flat[indices] = values`, an (out, in) matrix): the
    adapter's path beside a layer whose weight cannot hold it (a quantized base). Costs
    nnz * tokens multiply-adds (on the CPU, a GEMM on S written out densely when that is
    cheaper: `_dense_side`); the values' gradient is the same masked gradient as always."""
    x2 = x.reshape(-1, x.shape[-1])
    dense = _dense_side(x2, values, indices, out_features, in_features)
    y = side_forward(x2, indices, values, out_features, in_features) if dense is None else (
        (x2.float() @ dense.T).to(x.dtype))
    return y.reshape(*x.shape[:-1], out_features)


def _dense_side(src: Tensor, values: Tensor, indices: Tensor, out_features: int,
                in_features: int) -> Tensor | None:
    """S as a dense fp32 (out, in) matrix, for a CPU side product whose tokens x nnz outweigh
    writing S out (`DENSE_COPY_TOKENS_X_NNZ`: a GEMM then beats the sparse kernel); else None.
    Transient, like the dequantized weight the quantized layer's own matmul forms on the CPU."""
    if src.device.type != "cpu" or not _dense_is_cheaper(src.shape[0], indices.numel(),
                                                         out_features * in_features):
        return None
    dense = values.new_zeros(out_features * in_features, dtype=torch.float32)
    dense[indices.long()] = values.detach().float()
    return dense.view(out_features, in_features)


@side_linear.register_fake
def _(x, values, indices, out_features, in_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("shira_fx::side_grad_x", mutates_args=())
def side_grad_x(grad_y: Tensor, values: Tensor, indices: Tensor, out_features: int,
                in_features: int) -> Tensor:
    """`grad_y @ S`, `side_linear`'s input gradient, as an op of its own so a compiled backward
    keeps it opaque (its CPU path reads the CSR bounds back, which tracing cannot)."""
    gy = grad_y.reshape(-1, out_features)
    dense = _dense_side(gy, values, indices, out_features, in_features)
    grad_x = (side_backward_x(gy, indices, values, out_features, in_features) if dense is None
              else (gy.float() @ dense).to(grad_y.dtype))
    return grad_x.reshape(*grad_y.shape[:-1], in_features)


@side_grad_x.register_fake
def _(grad_y, values, indices, out_features, in_features):
    return grad_y.new_empty(*grad_y.shape[:-1], in_features)


def _side_setup(ctx, inputs, output) -> None:
    x, values, indices, out_features, in_features = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.shape = (out_features, in_features)


def _side_backward(ctx, grad_y: Tensor):
    x, values, indices = ctx.saved_tensors
    needs_x, needs_values = ctx.needs_input_grad[:2]
    out_features, in_features = ctx.shape
    gy = grad_y.reshape(-1, out_features)
    grad_x = grad_values = None
    if needs_x:
        grad_x = side_grad_x(gy, values, indices, out_features, in_features).reshape(x.shape).to(x.dtype)
    if needs_values:
        grad_values = masked_grad(gy, x.reshape(-1, in_features), indices, in_features, []).to(values.dtype)
    return grad_x, grad_values, None, None, None


side_linear.register_autograd(_side_backward, setup_context=_side_setup)


@torch.library.custom_op("shira_fx::request_linear", mutates_args=())
def request_linear(x: Tensor, weight: Tensor, bias: Tensor | None, row_adapters: Tensor, indices: Tensor,
                   values: Tensor, offsets: Tensor, transposed: bool) -> Tensor:
    """A mixed batch's whole linear on the CPU, for inference: batch row b (x's first
    dimension) computes with `weight` plus adapter `row_adapters[b]`'s correction (-1: none),
    correction a being `indices/values[offsets[a]:offsets[a+1]]` (flat offsets into the weight
    as stored). The rows of one adapter run together, either on a copy of the weight with the
    correction added (when their tokens times its nnz outweigh copying the weight) or on the
    weight plus the sparse side product: a mixed batch costs about the base model's linear."""
    out_features = weight.shape[1] if transposed else weight.shape[0]
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    y = x3.new_empty(*x3.shape[:2], out_features)
    bounds = offsets.tolist()
    groups: dict[int, list[int]] = {}
    for b, a in enumerate(row_adapters.tolist()):
        if not -1 <= a < len(bounds) - 1:
            raise ValueError(f"request_linear: row {b} names adapter {a}; the table holds {len(bounds) - 1}")
        groups.setdefault(a, []).append(b)
    for a, rows in groups.items():
        sel = torch.tensor(rows, device=x.device)
        xs = x3 if len(rows) == x3.shape[0] else x3.index_select(0, sel)
        lo, hi = (bounds[a], bounds[a + 1]) if a >= 0 else (0, 0)
        idx, val = indices[lo:hi], values[lo:hi]
        if _dense_is_cheaper(xs.shape[0] * xs.shape[1], hi - lo, weight.numel()):
            w = weight.clone()
            w.view(-1).index_add_(0, idx.long(), val.to(w.dtype))
            ys = _dense_linear(xs, w, bias, transposed)
        else:
            ys = _dense_linear(xs, weight, bias, transposed)
            if hi > lo:
                side = (side_backward_x(xs, idx, val, weight.shape[0], weight.shape[1]) if transposed
                        else side_forward(xs, idx, val, weight.shape[0], weight.shape[1]))
                ys = ys + side.to(ys.dtype)
        if len(rows) == x3.shape[0]:
            y = ys
        else:
            y.index_copy_(0, sel, ys.to(y.dtype))
    return y.reshape(*x.shape[:-1], out_features)


@request_linear.register_fake
def _(x, weight, bias, row_adapters, indices, values, offsets, transposed):
    out_features = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("shira_fx::side_segmented", mutates_args=())
def side_segmented(x: Tensor, seg_starts: Tensor, seg_adapters: Tensor, indices: Tensor, values: Tensor,
                   offsets: Tensor, out_features: int, in_features: int, transposed: bool) -> Tensor:
    """A mixed batch's side path, for inference: rows `[seg_starts[i], seg_starts[i+1])` of the
    2-D `x` get `x @ S_a.T` with adapter a = `seg_adapters[i]` (-1: none), adapter a's delta
    being `indices/values[offsets[a]:offsets[a+1]]`. Which adapter each row uses is data, not
    shape: a new list of requests compiles nothing. `transposed`: a weight stored (in, out)."""
    if transposed:  # S stored (in, out): x @ S (the side backward's product, roles swapped)
        return side_backward_x_segmented(x, seg_starts, seg_adapters, indices, values, offsets,
                                         in_features, out_features)
    return side_forward_segmented(x, seg_starts, seg_adapters, indices, values, offsets,
                                  out_features, in_features)


@side_segmented.register_fake
def _(x, seg_starts, seg_adapters, indices, values, offsets, out_features, in_features, transposed):
    return x.new_empty(x.shape[0], out_features)
