"""The joint-graph pass: tag the cheap pointwise/view chain producing each adapted linear's
input for recomputation, so the min-cut partitioner rebuilds x in backward from tensors it
keeps anyway instead of saving it (what LoRA keeps). Run by the backend inside Inductor's
`joint_custom_pre_pass` (or before its own min-cut partition for aot_eager).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .. import ops  # noqa: F401  (registers torch.ops.shira_fx)

_aten, _prims = torch.ops.aten, torch.ops.prims
# view and cast ops that are free or cheap to replay in backward
_REPLAYABLE = {
    _aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.t.default,
    _aten.transpose.int, _aten.permute.default, _aten.expand.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.slice.Tensor, _aten.select.int,
    _aten.clone.default, _aten.alias.default, _aten._to_copy.default,
    _prims.convert_element_type.default,
    # a LayerNorm output (post-LN BERT, pre-LN GPT-2/ViT) or GroupNorm output (a UNet's
    # resnets) is rebuilt from its input and the mean and rstd its own backward keeps anyway
    _aten.native_layer_norm.default, _aten.native_group_norm.default,
}
_NORMS = (_aten.native_layer_norm.default, _aten.native_group_norm.default)


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


def _adds_a_side_product(node: fx.Node) -> bool:
    """Whether `node` is a quantized layer's output, `base(x) + side_linear(x)`: like a
    `sparse_linear` output, it is kept as one tensor, not rebuilt from its two terms (which
    would keep both)."""
    if node.op != "call_function" or node.target is not _aten.add.Tensor:
        return False
    for term in node.all_input_nodes:
        while term.op == "call_function" and term.target in (_prims.convert_element_type.default,
                                                             _aten._to_copy.default):
            term = term.args[0]
        if term.op == "call_function" and term.target is torch.ops.shira_fx.side_linear.default:
            return True
    return False


def tag_sparse_linear_inputs(graph: fx.Graph) -> int:
    """Joint-graph pass: mark the pointwise/view chain that produces
    each `sparse_linear` input x as MUST_RECOMPUTE, so the min-cut partitioner rebuilds x in
    backward from tensors it keeps anyway instead of saving x (which is what LoRA keeps).
    The walk stops at matmuls, reductions (LayerNorm aside), random ops and graph inputs.
    Returns how many
    nodes were tagged."""
    from torch.utils.checkpoint import CheckpointPolicy

    tagged: set[fx.Node] = set()
    ops_with_x = [*graph.find_nodes(op="call_function", target=torch.ops.shira_fx.sparse_linear.default),
                  *graph.find_nodes(op="call_function", target=torch.ops.shira_fx.sparse_conv.default),
                  *graph.find_nodes(op="call_function", target=torch.ops.shira_fx.dequantized_linear.default),
                  *graph.find_nodes(op="call_function", target=torch.ops.shira_fx.side_linear.default)]
    for node in ops_with_x:
        stack = [node.args[0]]
        while stack:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in tagged or not _replayable(n) or _adds_a_side_product(n):
                continue
            if "recompute" in n.meta:  # inside a checkpointed region: its own policy holds
                continue
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta["ac_graph_id"] = 0
            tagged.add(n)
            if n.target not in _NORMS:  # a norm's input is kept anyway
                stack.extend(n.all_input_nodes)
    return len(tagged)
