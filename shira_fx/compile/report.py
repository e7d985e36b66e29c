"""What the backend did to one compiled graph: `RewriteReport` (the layers the rewrite took
and the ones it left, why), filled in by the rewrite and read back from the min-cut
partition (`record_partition`: which adapted inputs backward rebuilds, bytes held), and
printed by `shira_fx.explain`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .. import ops  # noqa: F401  (registers torch.ops.shira_fx)

SPARSE_LINEAR = torch.ops.shira_fx.sparse_linear.default
SPARSE_CONV = torch.ops.shira_fx.sparse_conv.default
TRAINING_OPS = (SPARSE_LINEAR, SPARSE_CONV)  # the ops a prepared layer trains through


@dataclass
class RewriteReport:
    """What one pass run saw: the layers that train through `sparse_linear` in this graph
    (`rewritten`) and, for every other prepared layer it saw, why not (`skipped`)."""

    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    recompute: bool = False  # the backend asked for each rewritten linear's x to be rebuilt
    recomputed: int = 0  # joint-graph nodes tagged
    checkpointed: list[str] = field(default_factory=list)  # inside a checkpointed body
    direct: list[str] = field(default_factory=list)  # weight uses outside the module rewritten
    dense: list[str] = field(default_factory=list)  # stacked parameters: a dense gradient, gathered
    side: list[str] = field(default_factory=list)  # quantized bases: the sparse side path beside them
    dequantized: list[str] = field(default_factory=list)  # quantized bases: one GEMM, delta written in
    # read off the partitioned graph (None/empty when the partitioner was not shira_fx's):
    # layer -> what backward does with its input x
    inputs: dict[str, str] = field(default_factory=dict)
    # layer -> how backward computes its values' gradient (kernels.masked_sddmm.describe)
    gradients: dict[str, str] = field(default_factory=dict)
    held_bytes: int | None = None  # saved for backward, parameters and buffers excluded
    held_tensors: int = 0
    # the check of the values' gradients against the reference (compile/verify.py): what it
    # found at the graph's first call, or why there is none
    verified: Any = None
    verify_note: str = ""

    def summary(self) -> str:
        if not self.rewritten and not self.skipped:
            return "no prepared layer in this graph"
        lines = [f"{len(self.rewritten)} layer(s) train through shira_fx::sparse_linear"]
        if self.rewritten and self.recompute:
            tagged = f"{self.recomputed} nodes tagged"
            if self.checkpointed:
                tagged += f", {len(self.checkpointed)} inside checkpointed regions"
            lines[0] += f"; inputs rebuilt in backward ({tagged})"
        elif self.rewritten:
            lines[0] += "; inputs saved for backward"
        if self.held_bytes is not None:
            lines.append(f"  held for backward: {_readable_bytes(self.held_bytes)} in {self.held_tensors} "
                         "tensor(s), parameters and buffers excluded")
        if self.verified is not None:
            worst = max((c.relative for c in self.verified.layers), default=0.0)
            lines.append(f"  gradients verified against aot_eager at the first call: largest relative "
                         f"error {worst:.1e} (tolerance {self.verified.tol:g})")
        elif self.verify_note:
            lines.append(f"  gradients {self.verify_note}")
        for name in self.rewritten:
            fate = self.inputs.get(name)
            lines.append(f"  + {name}" + (f": x {fate}" if fate else "")
                         + (" (its weight read directly too: rewritten)" if name in self.direct else "")
                         + (" (its weight read by the model's own code: a dense gradient there, "
                            "gathered at the mask)" if name in self.dense else "")
                         + (" (quantized base: the adapter rides beside it, x @ S.T)"
                            if name in self.side else "")
                         + (" (quantized base: one GEMM on its dequantized weight, delta written in)"
                            if name in self.dequantized else ""))
            if name in self.gradients:
                lines.append(f"      {self.gradients[name]}")
        lines += [f"  - {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _readable_bytes(nbytes: int | None) -> str:
    """Bytes for people: '? B' when unknown (symbolic sizes), else B, KiB or MiB."""
    if nbytes is None:
        return "? B"
    if nbytes < 2**10:
        return f"{nbytes} B"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes / 2**20:.2f} MiB"


def _nbytes(node: fx.Node) -> tuple[object, int | None]:
    """(storage key, bytes) of a node's example value, sizes at their hints when symbolic."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return node, None
    try:
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = val.untyped_storage()
        return StorageWeakRef(storage), _hint(storage.nbytes())
    except Exception:  # a tensor subclass without one storage
        return node, _tensor_bytes(node)


def _hint(n) -> int | None:
    """An int without guarding on it: int() of a symbolic size would specialise the graph."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return None if hint is None else int(hint)
    return int(n)


def _tensor_bytes(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    numel = 1
    for size in val.shape:
        size = _hint(size)
        if size is None:
            return None
        numel *= size
    return numel * val.element_size()


def _view_source(node: fx.Node) -> fx.Node:
    """Walk back through ops that only re-view their input (they save nothing of their own)."""
    while (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
           and node.target.is_view and node.args and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node


def record_partition(report: RewriteReport, joint: fx.GraphModule, backward: fx.GraphModule,
                     static_inputs: list[int] | None) -> None:
    """Fill `report.inputs` and `held_bytes` from a min-cut partition: which rewritten
    linears' inputs backward rebuilds and which it keeps (and why), and the bytes of every
    tensor saved for backward (the joint graph's parameters and buffers, `static_inputs`, and
    the masks' structures excluded: they are held anyway)."""
    saved = {n.name for n in backward.graph.nodes
             if n.op == "placeholder" and not n.name.startswith("tangents")}
    rebuilt = {n.name for n in backward.graph.nodes if n.op == "call_function"}
    primals = [n for n in joint.graph.nodes if n.op == "placeholder"]
    static = {primals[i].name for i in static_inputs or () if i < len(primals)}
    for node in joint.graph.find_nodes(op="call_function", target=SPARSE_LINEAR):
        static.update(t.name for t in node.args[6])  # the mask's structure: the module holds it anyway
    storages: dict[object, int | None] = {}
    for node in joint.graph.nodes:
        if node.name in saved and node.name not in static:
            if isinstance(node.meta.get("val"), (int, torch.SymInt)):
                continue  # a size (the structures' sizes are graph inputs): no tensor held
            key, nbytes = _nbytes(node)
            storages[key] = nbytes
    sizes = list(storages.values())
    report.held_tensors = len(sizes)
    report.held_bytes = None if None in sizes else sum(sizes)
    training = [n for op in TRAINING_OPS for n in joint.graph.find_nodes(op="call_function", target=op)]
    for node in training:
        layer = node.meta.get("custom", {}).get("shira_layer", node.name)
        x = node.args[0]
        size = _readable_bytes(_tensor_bytes(x))
        source = _view_source(x)
        if x.name in saved or source.name in saved:
            producer = source.args[0] if source.target is operator.getitem else source
            if source.op == "placeholder":
                why = "a graph input"
            elif not isinstance(producer.target, torch._ops.OpOverload):
                why = f"the output of {producer.target}"
            elif (torch.Tag.pointwise in producer.target.tags
                  or "dropout" in producer.target.name()):
                why = f"the output of {producer.target.name()}, random: never replayed"
            else:
                why = f"the output of {producer.target.name()}, which is not pointwise or a view"
            report.inputs[layer] = f"({size}) saved: it is {why}"
        elif x.name in rebuilt or source.name in rebuilt:
            where = "its checkpointed region" if layer in report.checkpointed else "tensors kept anyway"
            report.inputs[layer] = f"({size}) rebuilt in backward from {where}"
        else:
            report.inputs[layer] = f"({size}) not used by backward"
