"""SHiRA beyond one process: DDP as it is, FSDP2 through `fully_shard`.

DDP all-reduces exactly the values' gradients: they are module parameters. Under FSDP2
each rank keeps a row block (a DTensor shard) of every base weight; `fully_shard` installs a
per-layer writer so that `sync` writes `base + values` into the rank's own rows (flat indices
translated to local offsets), the all-gathers then ship fused weights, and the replicated
values' gradients are averaged at the end of each backward. docs/design.md says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import registry
from .adapter import SparseAdapter
from .errors import ShiraConfigError, ShiraTrainingError
from .layer import ShiraLayer


def shard_map(
    indices: Tensor, ncols: int, local_shape: tuple[int, ...], offset: tuple[int, ...]
) -> tuple[Tensor, slice | Tensor]:
    """For a 2-D block of a weight (global `offset`, `local_shape`): the flat local offsets
    (int32) of the layer's indices that fall in the block, and which values those are (a slice
    when contiguous, as for row shards of sorted indices, else positions)."""
    rows, cols = indices.long().div(ncols, rounding_mode="floor"), indices.long() % ncols
    (r0, c0), (nr, nc) = offset, local_shape
    own = ((rows >= r0) & (rows < r0 + nr) & (cols >= c0) & (cols < c0 + nc)).nonzero().squeeze(1)
    local = ((rows[own] - r0) * nc + (cols[own] - c0)).to(torch.int32)
    if own.numel() == 0:
        return local, slice(0, 0)
    first, last = int(own[0]), int(own[-1])
    if last - first + 1 == own.numel():
        return local, slice(first, last + 1)
    return local, own


class _ShardWriter:
    """What `sync` and `remove` write on this rank for one FSDP2-sharded layer: the local block
    of the weight with the layer's indices translated to it (the shard map is cached per shard
    geometry; the local tensor is looked up each time, because FSDP2 may re-pad the shard
    and move its storage at lazy init)."""

    def __init__(self) -> None:
        self.cached: tuple | None = None  # (shard geometry, local offsets, which values)

    def __call__(self, layer: ShiraLayer) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        weight = layer.weight
        if not registry.is_dtensor(weight):
            raise ShiraTrainingError(
                f"layer {layer.name!r}: FSDP2 holds the weight unsharded, so a write would be lost "
                "at the next all-gather; sync after backward (when FSDP2 has resharded)"
            )
        if weight.ndim != 2 or any(type(p) not in (Shard, Replicate) for p in weight.placements):
            raise ShiraConfigError(
                f"layer {layer.name!r}: placements {weight.placements} of a {weight.ndim}-D weight; "
                "expected Shard/Replicate of a 2-D weight"
            )
        shape, offset = compute_local_shape_and_global_offset(
            weight.shape, weight.device_mesh, weight.placements
        )
        key = (tuple(weight.shape), tuple(shape), tuple(offset))
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, *shard_map(layer.indices, weight.shape[1], shape, offset))
        _, indices, own = self.cached
        local = weight.to_local()
        if tuple(local.shape) != tuple(shape) or not local.is_contiguous():
            raise ShiraConfigError(
                f"layer {layer.name!r}: local shard {tuple(local.shape)} is not the contiguous "
                f"block {tuple(shape)} its placements describe"
            )
        return local, indices, layer.base[own], layer.values[own]


class _AverageGrads:
    """Post-accumulate-grad hook on every value: the first one in a backward queues a callback
    that, once the whole backward is done, all-reduces the values' gradients in one flat
    buffer and divides by the world size (as DDP does). A value without a gradient on this
    rank contributes zeros, so every rank sends the same buffer. Keyed by the backward's task
    id, so a backward that raised (and never ran its callback) does not block the next one."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None):
        if len({p.dtype for p in params}) > 1:
            raise ShiraConfigError("fully_shard: the adapter's values must share one dtype")
        self.params, self.group, self.task = params, group, None

    def __call__(self, param: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.task = task
            torch.autograd.Variable._execution_engine.queue_callback(self.reduce)

    @torch.no_grad()
    def reduce(self) -> None:
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params
        ])
        dist.all_reduce(flat, group=self.group)
        flat.div_(dist.get_world_size(self.group))
        for p, g in zip(self.params, flat.split([p.numel() for p in self.params]), strict=True):
            if p.grad is None:
                p.grad = g.view_as(p).clone()
            else:
                p.grad.copy_(g.view_as(p))


def _recognise_gathered(layers: list[ShiraLayer]) -> Callable:
    """Forward pre-hook for a sharded module, run after FSDP2's own (which all-gathers):
    registers the unsharded parameter FSDP2 now holds in each layer's module, so the
    backend's pass finds it among a compiled graph's inputs by identity. FSDP2 keeps one
    unsharded parameter per weight, so this registers once and then only checks."""

    @torch._dynamo.disable
    def hook(module: nn.Module, args: tuple) -> None:
        for layer in layers:
            w = layer.weight
            if not registry.is_dtensor(w) and registry.layer_for(w) is not layer:
                registry.register(w, layer)

    return hook


def fully_shard(
    model: nn.Module, adapter: SparseAdapter, modules: Iterable[nn.Module] = (), **kwargs
) -> nn.Module:
    """FSDP2 for a prepared model: `torch.distributed.fsdp.fully_shard` on each of `modules`
    (e.g. the decoder blocks, innermost first) and then on `model`, with the adapter's values
    left replicated. Afterwards `sync` writes each rank's own rows of the fused weights, the
    values' gradients are averaged across ranks at the end of every backward, and the
    backend recognises the weights FSDP2 gathers. `kwargs` go to `fully_shard` (mesh,
    reshard_after_forward, mp_policy, ...). `adapter.remove()` restores the base in the
    shards and takes these hooks off; the model stays sharded."""
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    values = {id(p) for p in adapter.parameters()}
    extra_ignored = set(kwargs.pop("ignored_params", None) or ())
    claimed: set[int] = set()
    for unit in [*modules, model]:
        ignored = {p for p in unit.parameters() if id(p) in values} | extra_ignored
        torch_fully_shard(unit, ignored_params=ignored or None, **kwargs)
        inside = {id(m) for m in unit.modules()}
        layers = [la for la in adapter.layers.values()
                  if id(la.module) in inside and id(la) not in claimed]
        claimed.update(id(la) for la in layers)
        if layers:
            adapter._hooks.append(unit.register_forward_pre_hook(_recognise_gathered(layers)))
    for layer in adapter.layers.values():
        if not registry.is_dtensor(layer.weight):
            raise ShiraConfigError(f"fully_shard: {layer.name!r} was not sharded")
        layer.writer = _ShardWriter()
    mesh = kwargs.get("mesh")
    group = mesh.get_group() if mesh is not None and mesh.ndim == 1 else None
    averager = _AverageGrads(list(adapter.parameters()), group)
    for p in adapter.parameters():
        adapter._hooks.append(p.register_post_accumulate_grad_hook(averager))
    return model
