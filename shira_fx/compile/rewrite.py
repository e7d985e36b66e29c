"""The pre-AOT fx pass over Dynamo graphs: name the layers that train through `sparse_linear`,
and route every other training use of a prepared weight through it too.

A prepared module's forward calls `shira_fx::sparse_linear` itself, so Dynamo lifts the
weight, values and indices as graph inputs (placeholders whose example inputs are the real
tensors, recognised by identity). A weight also read outside its module's forward (`x @ W.T`,
`F.linear(x, W)`, `W @ y`) is rewritten to the same op with that layer's values and indices;
a use the pass cannot rewrite is refused, since its gradient would never reach the values.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from .. import registry
from ..errors import ShiraTrainingError
from ..kernels.masked_sddmm import describe
from ..layer import ShiraLayer, structure_of
from .report import SPARSE_LINEAR, TRAINING_OPS, RewriteReport, _hint

# a quantized layer's one GEMM on its dequantized weight (values at the same operand as sparse_linear's)
DEQUANTIZED_LINEAR = torch.ops.shira_fx.dequantized_linear.default

LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.mm, torch.ops.aten.mm.default, "matmul", "mm")
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)
# higher-order ops whose body the pass enters (Dynamo's form of torch.utils.checkpoint)
ENTERED_HOPS = (torch.ops.higher_order.tag_activation_checkpoint, torch.ops.higher_order.wrap)


def _body(gm: fx.GraphModule, hop: fx.Node) -> fx.GraphModule | None:
    getter = hop.args[0] if hop.args else None
    if not isinstance(getter, fx.Node) or getter.op != "get_attr":
        return None
    body = getattr(gm, getter.target, None)
    return body if isinstance(body, fx.GraphModule) else None


def _attribute(gm: fx.GraphModule, target: str) -> object:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


@dataclass
class _Inputs:
    """The nodes of one graph that carry a prepared layer's tensors."""

    weight: list[fx.Node] = field(default_factory=list)
    values: fx.Node | None = None
    indices: fx.Node | None = None


def _prepared_inputs(gm: fx.GraphModule, example_inputs: list) -> dict[ShiraLayer, _Inputs]:
    """Every prepared layer whose weight or values `gm` reads, with the nodes that carry them:
    placeholders whose example input is the tensor itself, or get_attr nodes of it."""
    found: dict[ShiraLayer, _Inputs] = {}  # ShiraLayer hashes by identity
    placeholders = iter(example_inputs)
    pending: list[tuple[fx.Node, object]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            tensor = next(placeholders, None)
        elif node.op == "get_attr":
            tensor = _attribute(gm, node.target)
        else:
            continue
        layer = registry.layer_for(tensor)
        if layer is None:
            pending.append((node, tensor))
            continue
        slot = found.setdefault(layer, _Inputs())
        if tensor is layer.values:
            slot.values = node
        else:
            slot.weight.append(node)
    for node, tensor in pending:  # indices are not registered: match them by identity
        for layer, slot in found.items():
            if tensor is layer.indices:
                slot.indices = node
    return found


def _outer(node: fx.Node, path: tuple[fx.Node, ...], owners: tuple[fx.GraphModule, ...]) -> fx.Node:
    """The outer-graph node a node inside nested higher-order-op bodies stands for."""
    for hop, body in zip(reversed(path), reversed(owners[1:]), strict=True):
        if node.op != "placeholder":
            return node
        slot = [n for n in body.graph.nodes if n.op == "placeholder"].index(node)
        node = hop.args[1 + slot]
    return node


def _sparse_calls(gm: fx.GraphModule, path=(), owners=None):
    """(training op node, its values node in the outer graph, inside a checkpoint?) for every
    call of `sparse_linear`, `sparse_conv` or `dequantized_linear` in `gm` and in the bodies of
    the higher-order ops it calls."""
    owners = owners or (gm,)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (*TRAINING_OPS, DEQUANTIZED_LINEAR):
            yield node, _outer(node.args[3], path, owners), bool(path)
        elif node.op == "call_function" and node.target in ENTERED_HOPS:
            body = _body(gm, node)
            if body is not None:
                yield from _sparse_calls(body, path + (node,), owners + (body,))


def _transposed_weight(node: fx.Node, weight: fx.Node) -> bool:
    """Is `node` W.t(), W.T, W.transpose(0, 1)/(-1, -2) or W.permute(1, 0) of this weight?"""
    if not node.args or node.args[0] is not weight:
        return False
    if node.op == "call_method" and node.target == "t" or node.target is torch.t:
        return True
    if node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return True
    if node.op == "call_method" and node.target == "transpose" or node.target is torch.transpose:
        return set(node.args[1:]) in ({0, 1}, {-1, -2})
    if node.op == "call_method" and node.target == "permute":
        return tuple(node.args[1:]) in ((1, 0), ((1, 0),))
    return False


def _gradient_path(node: fx.Node, layer: ShiraLayer) -> str | None:
    """How the backward of this `sparse_linear` call computes the values' gradient (the
    dispatcher's parts and path for the layer's structure, at the graph's example T), or None
    when x carries no example value."""
    val, weight = (n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None
                   for n in node.args[:2])
    if not isinstance(val, torch.Tensor) or not isinstance(weight, torch.Tensor) or val.dim() < 1:
        return None
    sizes = [_hint(s) for s in (*val.shape, *weight.shape)]
    if None in sizes or len(sizes) != val.dim() + 2:
        return None
    tokens = math.prod(sizes[: val.dim() - 1])
    # masked_grad(grad_y, x) on (out, in) storage, masked_grad(x, grad_y) on (in, out): a (T, rows)
    # and b (T, cols) of the weight as stored either way
    rows, cols = sizes[-2:]
    return describe(val.device, val.dtype, val.dtype, tokens, rows, cols, layer.indices.numel(),
                    structure_of(layer.module))


def _rank(node: object) -> int | None:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


ALIAS = torch.ops.higher_order.autograd_function_apply


def _alias_of(node: fx.Node, weight: fx.Node, slot: _Inputs) -> fx.Node | bool:
    """For a call of `_ParamWithValues` (the adapter's property read of a weight outside its
    module's forward) on this layer's weight, values and indices: its output node, or True
    when nothing uses it (a read for `.dtype` or `.shape`); False for any other node."""
    if node.op != "call_function" or node.target is not ALIAS or len(node.args) != 5:
        return False
    if node.args[2:] != (weight, slot.values, slot.indices):
        return False
    outs = list(node.users)
    if all(o.target is operator.getitem and not o.users for o in outs):
        return True
    if len(outs) == 1 and outs[0].target is operator.getitem and outs[0].args[1] == 0:
        return outs[0]
    return False


def _direct_use(graph: fx.Graph, use: fx.Node, weight: fx.Node, layer: ShiraLayer, slot: _Inputs,
                raw: fx.Node | None = None):
    """Rewrite one use of a prepared weight outside its module's forward to `sparse_linear`
    (with this graph's values and indices of the layer; `raw` is the weight placeholder when
    `weight` is the adapter's property read of it); returns None when done, else the reason
    it cannot be."""
    raw = weight if raw is None else raw
    target = use.target if use.op == "call_function" else use.target if use.op == "call_method" else None
    name = getattr(target, "__name__", str(target))
    if slot.values is None or slot.indices is None:
        return (f"its weight is read by {name} in a compiled graph where the module's own forward "
                "never runs, so the values (not an input of this graph) cannot get that gradient")

    def emit(x, bias, transpose_in=False, transpose_out=False, at=use):
        with graph.inserting_before(at):
            if transpose_in:
                x = graph.call_method("transpose", (x, -1, -2))
            out = graph.call_function(SPARSE_LINEAR, (x, raw, bias, slot.values, slot.indices,
                                                      layer.transposed, []))
            out.meta["custom"] = {"shira_layer": layer.name}
            if transpose_out:  # contiguous, as the matmul it replaces returns
                out = graph.call_method("contiguous", (graph.call_method("transpose", (out, -1, -2)),))
        return out

    args = use.args
    if target in LINEAR_TARGETS and not layer.transposed and len(args) >= 2 and args[1] is weight:
        new = emit(args[0], args[2] if len(args) > 2 else use.kwargs.get("bias"))
        use.replace_all_uses_with(new)
        graph.erase_node(use)
        return None
    if target in ADDMM_TARGETS and layer.transposed and len(args) == 3 and args[2] is weight:
        new = emit(args[1], args[0])
        use.replace_all_uses_with(new)
        graph.erase_node(use)
        return None
    if target in MATMUL_TARGETS and len(args) == 2 and args[0] is weight and not layer.transposed:
        rank = _rank(args[1])  # W @ y = (y^T @ W^T)^T
        if rank is not None:
            new = emit(args[1], None, transpose_in=rank > 1, transpose_out=rank > 1)
            use.replace_all_uses_with(new)
            graph.erase_node(use)
            return None
    if _transposed_weight(use, weight) and not layer.transposed:
        matmuls = list(use.users)
        if matmuls and all(m.target in MATMUL_TARGETS and len(m.args) == 2 and m.args[1] is use
                           and m.args[0] is not use for m in matmuls):
            for m in matmuls:  # x @ W^T
                new = emit(m.args[0], None, at=m)
                m.replace_all_uses_with(new)
                graph.erase_node(m)
            graph.erase_node(use)
            return None
    return f"its weight is read by {name}, outside its module's forward, in a form the pass cannot rewrite"


def rewrite_sparse_linears(gm: fx.GraphModule, example_inputs: list) -> RewriteReport:
    """Name the layers that train through `sparse_linear` in `gm` (their calls tagged for the
    memory report), and rewrite, in place, every other use of their weights.

    Raises ShiraTrainingError when a prepared weight whose values train is used in a way the
    pass cannot route to the values: that gradient would be lost silently. Graphs run without
    grad (inference) keep every use as it is.
    """
    report = RewriteReport()
    found = _prepared_inputs(gm, example_inputs)
    if not found:
        return report
    if not torch.is_grad_enabled():
        for layer in found:
            report.skipped[layer.name] = "graph runs without grad (inference): dense linear kept"
        return report
    by_values = {slot.values: layer for layer, slot in found.items() if slot.values is not None}
    for node, values, checkpointed in _sparse_calls(gm):
        layer = by_values.get(values)
        if layer is None:
            continue
        node.meta["custom"] = {**node.meta.get("custom", {}), "shira_layer": layer.name}
        if layer.name not in report.rewritten:
            report.rewritten.append(layer.name)
        if node.target is DEQUANTIZED_LINEAR and layer.name not in report.dequantized:
            report.dequantized.append(layer.name)
        if (node.target is SPARSE_LINEAR and layer.name not in report.gradients
                and (how := _gradient_path(node, layer)) is not None):
            report.gradients[layer.name] = how
        if checkpointed and layer.name not in report.checkpointed:
            report.checkpointed.append(layer.name)
    refused = {}
    for layer, slot in found.items():
        if not layer.values.requires_grad:
            report.skipped[layer.name] = "values do not require grad: dense linear kept"
            continue
        if layer.param != "weight":  # read through its property, with the values in autograd
            report.rewritten.append(layer.name)
            report.dense.append(layer.name)
            continue
        if layer.quantized:  # one GEMM on its dequantized weight, or its own layer and the side path
            if slot.values is not None:
                if layer.name not in report.rewritten:
                    report.rewritten.append(layer.name)
                if layer.name not in report.dequantized:
                    report.side.append(layer.name)
                layer.compiled = True
            continue
        for weight in slot.weight:
            for use in list(weight.users):
                if use.op == "call_function" and use.target in TRAINING_OPS and use.args[1] is weight:
                    continue
                if use.op == "call_function" and use.target in ENTERED_HOPS:
                    body = _body(gm, use)
                    inner = [n for n in body.graph.nodes if n.op == "placeholder"] if body else []
                    slots = [i for i, a in enumerate(use.args[1:]) if a is weight]
                    if body is not None and all(
                            all(u.target in (*TRAINING_OPS, ALIAS) for u in inner[i].users) for i in slots):
                        continue
                    why = "its weight is used inside a checkpointed region other than by its module"
                elif (alias := _alias_of(use, weight, slot)) is True:  # read, never used: drop it
                    for out in list(use.users):
                        gm.graph.erase_node(out)
                    gm.graph.erase_node(use)
                    continue
                elif alias is not False:
                    # read through the adapter's property: correct as it is (a dense gradient
                    # at that use); the usual forms become the sparse op
                    left = [u for u in list(alias.users)
                            if _direct_use(gm.graph, u, alias, layer, slot, raw=weight) is not None]
                    if not left:
                        gm.graph.erase_node(alias)
                        gm.graph.erase_node(use)
                    elif layer.name not in report.dense:
                        report.dense.append(layer.name)
                    why = None
                else:
                    why = _direct_use(gm.graph, use, weight, layer, slot)
                if why is None:
                    if layer.name not in report.rewritten:
                        report.rewritten.append(layer.name)
                    if layer.name not in report.direct:
                        report.direct.append(layer.name)
                else:
                    refused[layer.name] = why
        if layer.name not in report.rewritten and layer.name not in refused:
            refused[layer.name] = "its weight is read in this graph but never through its forward"
        if layer.name in report.rewritten:
            layer.compiled = True
    if refused:
        report.skipped.update(refused)
        raise ShiraTrainingError(
            "shira_fx: the values of these layers would silently miss part of their gradient: "
            + "; ".join(f"{name}: {why}" for name, why in refused.items())
            + ". Leave them out (ShiraConfig(exclude_modules=[...]))"
        )
    gm.graph.lint()
    gm.recompile()
    return report
