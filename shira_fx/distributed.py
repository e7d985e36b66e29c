"""SHiRA beyond one process: DDP after `adapter.register_values()`, FSDP2 through `fully_shard`.

DDP. `prepare` freezes the base, so the values are the only parameters that need a gradient.
Once `register_values` makes them parameters of their modules, `DistributedDataParallel(model)`
all-reduces exactly their gradients and nothing else changes: the compiled graph, the sync
after `optimizer.step()` and the saved adapter are those of a single process. The values enter
a compiled graph through the backend's pass, not as Dynamo inputs, so Dynamo's DDPOptimizer
counts no trainable parameter and compiles one graph. If other large parameters train too it
splits the graph and hands the backend fake tensors, which the pass cannot match to prepared
weights (the values then get no gradient and DDP or `train_step` raises): set
`torch._dynamo.config.optimize_ddp = False` in that case.

FSDP2. Each rank keeps a Shard(0) block of every base weight (a DTensor) and all-gathers the
full weight just before a sharded module runs. `W = base + values` at the mask can be kept
two ways:

* fuse after every all-gather (the shard holds the plain base; the values are scattered into
  the gathered weight): twice per step with `reshard_after_forward`, from inside FSDP2, which
  has no public post-all-gather hook for plain tensors;
* write each rank's own rows (chosen): after `optimizer.step()` each rank scatters
  `base + values` into its own shard at the indices it holds, translated to local offsets.
  The all-gather then ships fused weights, so forward and backward, compiled or eager, read
  exactly the weight one process would; nothing runs per all-gather; a step writes
  O(nnz / world) elements.

The values stay replicated: FSDP2 does not manage them, every rank's backward yields the full
gradient on its micro-batch, and one all-reduce at the end of backward averages them (the
traffic DDP would have). At 1 % density fp32 values with AdamW state cost 0.12 bytes per base
parameter on every rank; sharding them too would need an all-gather of the values before
each write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .adapter import ShiraLayer, SparseAdapter, _is_dtensor, _register, layer_for_weight
from .errors import ShiraConfigError


def local_plan(
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


def local_write_target(layer: ShiraLayer, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(local shard, local indices, base, values) for a DTensor weight: what `sync` and `remove`
    write on this rank. The plan is cached per shard geometry; the local tensor is looked up
    each time because FSDP2 may re-pad the shard (and move its storage) at lazy init."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if weight.ndim != 2 or any(type(p) not in (Shard, Replicate) for p in weight.placements):
        raise ShiraConfigError(
            f"layer {layer.name!r}: placements {weight.placements} of a {weight.ndim}-D weight; "
            "expected Shard/Replicate of a 2-D weight"
        )
    shape, offset = compute_local_shape_and_global_offset(
        weight.shape, weight.device_mesh, weight.placements
    )
    key = (tuple(weight.shape), tuple(shape), tuple(offset))
    if layer._shard_plan is None or layer._shard_plan[0] != key:
        layer._shard_plan = (key, *local_plan(layer.indices, weight.shape[1], shape, offset))
    _, indices, own = layer._shard_plan
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
            w = layer.module.weight
            if not _is_dtensor(w) and layer_for_weight(w) is not layer:
                _register(w, layer)

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
        if not _is_dtensor(layer.weight):
            raise ShiraConfigError(f"fully_shard: {layer.name!r} was not sharded")
        layer.sharded = True
    mesh = kwargs.get("mesh")
    group = mesh.get_group() if mesh is not None and mesh.ndim == 1 else None
    averager = _AverageGrads(list(adapter.parameters()), group)
    for p in adapter.parameters():
        adapter._hooks.append(p.register_post_accumulate_grad_hook(averager))
    return model
