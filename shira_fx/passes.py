"""torch.fx pass: rewrite linear calls on prepared weights to `shira_fx::sparse_linear`.

Dynamo graphs take parameters as placeholders whose example inputs are the real
nn.Parameter objects (RESEARCH.md §3.1), so a prepared weight is recognised by identity.
The values and indices are not Dynamo inputs; the pass attaches them to the GraphModule and
reads them with get_attr nodes, so AOTAutograd lifts the values as trainable inputs and no
Dynamo guard ever looks at them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from . import ops  # noqa: F401  (registers torch.ops.shira_fx)
from .adapter import ShiraLayer, layer_for_weight

LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)


@dataclass
class RewriteReport:
    """What one pass run did: layer name -> reason for every prepared weight it saw."""

    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    recompute: bool = False  # the backend asked for each rewritten linear's x to be rebuilt
    recomputed: int = 0  # joint-graph nodes tagged (0 when Inductor served a cached graph)

    def summary(self) -> str:
        lines = [f"rewrote {len(self.rewritten)} linear(s) to shira_fx::sparse_linear"]
        if self.rewritten and self.recompute:
            tagged = f" ({self.recomputed} nodes tagged)" if self.recomputed else " (cached graph)"
            lines[0] += "; inputs rebuilt in backward" + tagged
        elif self.rewritten:
            lines[0] += "; inputs saved for backward"
        lines += [f"  + {name}" for name in self.rewritten]
        lines += [f"  - {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _match(node: fx.Node, weight: fx.Node, layer: ShiraLayer):
    """(x, bias) when `node` is the layer's linear with `weight` in the weight slot, else a
    reason string for the report."""
    if node.op != "call_function":
        return f"weight used by {node.op} {node.target}"
    args, kwargs = node.args, node.kwargs
    if node.target in LINEAR_TARGETS and not layer.transposed:
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if w is weight:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[0] if args else kwargs["input"], bias
    if node.target in ADDMM_TARGETS and layer.transposed:
        if len(args) == 3 and args[2] is weight and not kwargs:
            return args[1], args[0]
    name = getattr(node.target, "__name__", str(node.target))
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return (f"weight used inside {name} (e.g. gradient checkpointing), which the pass does "
                "not enter: train eagerly or without checkpointing")
    return f"weight used by {name} (not a plain linear)"


def rewrite_sparse_linears(gm: fx.GraphModule, example_inputs: list) -> RewriteReport:
    """Rewrite, in place, every linear of `gm` whose weight is a prepared layer's weight.

    Only when autograd is on: a no-grad (inference) graph keeps the plain dense linear.
    """
    report = RewriteReport()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = [
        (node, layer)
        for node, ex in zip(placeholders, example_inputs, strict=False)
        if (layer := layer_for_weight(ex)) is not None
    ]
    if not found:
        return report
    if not torch.is_grad_enabled():
        for _, layer in found:
            report.skipped[layer.name] = "graph runs without grad (inference): dense linear kept"
        return report
    graph = gm.graph
    for weight_node, layer in found:
        if not layer.values.requires_grad:
            report.skipped[layer.name] = "values do not require grad: dense linear kept"
            continue
        matches = [(user, _match(user, weight_node, layer)) for user in list(weight_node.users)]
        bad = [m for _, m in matches if isinstance(m, str)]
        if bad:
            report.skipped[layer.name] = bad[0]
            continue
        slot = len(report.rewritten)
        values_attr, indices_attr = f"_shira_values_{slot}", f"_shira_indices_{slot}"
        gm.register_parameter(values_attr, layer.values)
        gm.register_buffer(indices_attr, layer.indices)
        param_sources = getattr(gm, "_param_name_to_source", None)
        if param_sources is not None:
            # AOTAutograd looks every GraphModule parameter up by name (RESEARCH.md §3.2)
            from torch._dynamo.source import ConstantSource

            param_sources[values_attr] = ConstantSource(values_attr)
            param_sources[indices_attr] = ConstantSource(indices_attr)
        for user, (x, bias) in matches:
            with graph.inserting_before(user):
                values_node = graph.get_attr(values_attr)
                indices_node = graph.get_attr(indices_attr)
                new = graph.call_function(
                    torch.ops.shira_fx.sparse_linear.default,
                    (x, weight_node, bias, values_node, indices_node, layer.transposed),
                )
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        report.rewritten.append(layer.name)
    graph.lint()
    gm.recompile()
    return report


_aten, _prims = torch.ops.aten, torch.ops.prims
# view and cast ops that are free or cheap to replay in backward
_REPLAYABLE = {
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.t.default,
    _aten.transpose.int, _aten.permute.default, _aten.expand.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.slice.Tensor, _aten.select.int,
    _aten.clone.default, _aten.alias.default, _aten._to_copy.default,
    _prims.convert_element_type.default,
    # a LayerNorm output (post-LN BERT, pre-LN GPT-2/ViT) is rebuilt from its input and the
    # mean and rstd that its own backward keeps anyway
    _aten.native_layer_norm.default,
}


def _replayable(node: fx.Node) -> bool:
    """Pointwise or view ops, never random ones (replaying dropout would change the mask)."""
    target = node.target
    if node.op == "call_function" and target is operator.getitem:  # an output of a replayable op
        return isinstance(node.args[0], fx.Node) and _replayable(node.args[0])
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return target in _REPLAYABLE or torch.Tag.pointwise in target.tags


def tag_sparse_linear_inputs(graph: fx.Graph) -> int:
    """Joint-graph pass (DESIGN.md invariant 5): mark the pointwise/view chain that produces
    each `sparse_linear` input x as MUST_RECOMPUTE, so the min-cut partitioner rebuilds x in
    backward from tensors it keeps anyway instead of saving x (which is what LoRA keeps).
    The walk stops at matmuls, reductions (LayerNorm aside), random ops and graph inputs.
    Returns how many
    nodes were tagged."""
    from torch.utils.checkpoint import CheckpointPolicy

    tagged: set[fx.Node] = set()
    for node in graph.find_nodes(op="call_function", target=torch.ops.shira_fx.sparse_linear.default):
        stack = [node.args[0]]
        while stack:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in tagged or not _replayable(n):
                continue
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta["ac_graph_id"] = 0
            tagged.add(n)
            if n.target is not _aten.native_layer_norm.default:  # its input is kept anyway
                stack.extend(n.all_input_nodes)
    return len(tagged)
