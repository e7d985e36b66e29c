"""torch.fx pass: rewrite linear calls on prepared weights to `shira_fx::sparse_linear`.

Dynamo passes parameters as placeholders whose example inputs are the real nn.Parameter
objects (or as get_attr nodes), so a prepared weight is recognised by identity. The values
and indices are attached to the GraphModule and read with get_attr nodes, so AOTAutograd lifts
the values as trainable inputs; the compiled code is guarded on each layer's uid so it never
runs for another layer's weight (`adapter._sparse_forward`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from . import (
    ops,  # noqa: F401  (registers torch.ops.shira_fx)
    registry,
)
from .adapter import ShiraLayer

LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
ADDMM_TARGETS = (torch.addmm, torch.ops.aten.addmm.default)


@dataclass
class RewriteReport:
    """What one pass run did: layer name -> reason for every prepared weight it saw."""

    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    recompute: bool = False  # the backend asked for each rewritten linear's x to be rebuilt
    recomputed: int = 0  # joint-graph nodes tagged
    checkpointed: list[str] = field(default_factory=list)  # rewritten inside a checkpointed body
    # read off the partitioned graph (None/empty when the partitioner was not shira_fx's):
    # layer -> what backward does with its input x
    inputs: dict[str, str] = field(default_factory=dict)
    held_bytes: int | None = None  # saved for backward, parameters and buffers excluded
    held_tensors: int = 0

    def summary(self) -> str:
        if not self.rewritten and not self.skipped:
            return "no prepared layer in this graph"
        lines = [f"rewrote {len(self.rewritten)} linear(s) to shira_fx::sparse_linear"]
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
        for name in self.rewritten:
            fate = self.inputs.get(name)
            lines.append(f"  + {name}" + (f": x {fate}" if fate else ""))
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


# higher-order ops whose body the pass enters: (body, *operands), the body's placeholders
# taking the operands in order (Dynamo's form of torch.utils.checkpoint and of plain wraps)
ENTERED_HOPS = (torch.ops.higher_order.tag_activation_checkpoint, torch.ops.higher_order.wrap)


@dataclass
class _Site:
    """One linear to rewrite: `node` in `owner`, reached from the outer graph through the
    higher-order-op calls in `path` (empty for a linear of the outer graph)."""

    owner: fx.GraphModule
    node: fx.Node
    weight: fx.Node
    x: fx.Node
    bias: fx.Node | None
    path: tuple[fx.Node, ...]


def _body(gm: fx.GraphModule, hop: fx.Node) -> fx.GraphModule | None:
    getter = hop.args[0] if hop.args else None
    if not isinstance(getter, fx.Node) or getter.op != "get_attr":
        return None
    body = getattr(gm, getter.target, None)
    return body if isinstance(body, fx.GraphModule) else None


def _sites(gm: fx.GraphModule, weight: fx.Node, layer: ShiraLayer,
           path: tuple[fx.Node, ...] = ()) -> list[_Site] | str:
    """Every linear that reads `weight` in `gm`, following the weight into checkpointed (and
    other wrapped) bodies, or a reason string for the report when one use is not a linear."""
    found: list[_Site] = []
    for user in list(weight.users):
        if user.op == "call_function" and user.target in ENTERED_HOPS:
            body = _body(gm, user)
            shared = body is not None and len(user.args[0].users) > 1
            if body is None or shared:
                return (f"weight used inside {user.target.__name__} whose body is "
                        f"{'shared by several calls' if shared else 'not a graph module'}")
            slots = [i for i, a in enumerate(user.args[1:]) if a is weight]
            inner = [n for n in body.graph.nodes if n.op == "placeholder"]
            if len(inner) != len(user.args) - 1 or user.kwargs.get("context_fn") is not None:
                return f"weight used inside {user.target.__name__} in an unexpected form"
            for slot in slots:
                more = _sites(body, inner[slot], layer, path + (user,))
                if isinstance(more, str):
                    return more
                found += more
            continue
        match = _match(user, weight, layer)
        if isinstance(match, str):
            return match
        found.append(_Site(gm, user, weight, match[0], match[1], path))
    return found


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
        return f"weight used inside {name}, which the pass does not enter"
    return f"weight used by {name} (not a plain linear)"


def _thread(gm: fx.GraphModule, path: tuple[fx.Node, ...], attrs: tuple[str, str],
            cache: dict) -> tuple[fx.GraphModule, fx.Node, fx.Node]:
    """(graph module, values node, indices node) inside the graph that `path` leads to:
    get_attr nodes in the outer graph, passed down as extra operands (and placeholders) of
    each higher-order op on the way, so a checkpointed body stays a pure function."""
    if path in cache:
        return cache[path]
    if not path:
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            found = (gm, *(gm.graph.get_attr(a) for a in attrs))
    else:
        owner, outer_values, outer_indices = _thread(gm, path[:-1], attrs, cache)
        hop = path[-1]
        body = _body(owner, hop)
        hop.args = (*hop.args, outer_values, outer_indices)
        last = [n for n in body.graph.nodes if n.op == "placeholder"][-1]
        with body.graph.inserting_after(last):
            values = body.graph.placeholder(f"{attrs[0]}_in")
        with body.graph.inserting_after(values):
            indices = body.graph.placeholder(f"{attrs[1]}_in")
        found = (body, values, indices)
    cache[path] = found
    return found


def _attribute(gm: fx.GraphModule, target: str) -> object:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _prepared_weights(gm: fx.GraphModule, example_inputs: list) -> dict[ShiraLayer, list[fx.Node]]:
    """Every prepared layer whose weight `gm` reads, with the nodes that read it: get_attr
    nodes of it (there may be several), or the placeholder whose example input is it."""
    found: dict[ShiraLayer, list[fx.Node]] = {}  # ShiraLayer hashes by identity
    placeholders = iter(example_inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            weight = next(placeholders, None)
        elif node.op == "get_attr":
            weight = _attribute(gm, node.target)
        else:
            continue
        if (layer := registry.layer_for(weight)) is not None:
            found.setdefault(layer, []).append(node)
    return found


def rewrite_sparse_linears(gm: fx.GraphModule, example_inputs: list) -> RewriteReport:
    """Rewrite, in place, every linear of `gm` whose weight is a prepared layer's weight,
    including linears inside gradient-checkpointed bodies.

    Only when autograd is on: a no-grad (inference) graph keeps the plain dense linear.
    """
    report = RewriteReport()
    found = _prepared_weights(gm, example_inputs)
    if not found:
        return report
    if not torch.is_grad_enabled():
        for layer in found:
            report.skipped[layer.name] = "graph runs without grad (inference): dense linear kept"
        return report
    touched = {gm}
    for layer, weight_nodes in found.items():
        if not layer.values.requires_grad:
            report.skipped[layer.name] = "values do not require grad: dense linear kept"
            continue
        sites = []
        for weight_node in weight_nodes:
            more = _sites(gm, weight_node, layer)
            if isinstance(more, str):
                sites = more
                break
            sites += more
        if isinstance(sites, str):
            report.skipped[layer.name] = sites
            continue
        slot = len(report.rewritten)
        attrs = (f"_shira_values_{slot}", f"_shira_indices_{slot}")
        gm.register_parameter(attrs[0], layer.values)
        gm.register_buffer(attrs[1], layer.indices)
        param_sources = getattr(gm, "_param_name_to_source", None)
        if param_sources is not None:
            # AOTAutograd looks every GraphModule parameter up by name
            from torch._dynamo.source import ConstantSource

            for attr in attrs:
                param_sources[attr] = ConstantSource(attr)
        cache: dict = {}
        for site in sites:
            _, values_node, indices_node = _thread(gm, site.path, attrs, cache)
            graph = site.owner.graph
            with graph.inserting_before(site.node):
                new = graph.call_function(
                    torch.ops.shira_fx.sparse_linear.default,
                    (site.x, site.weight, site.bias, values_node, indices_node, layer.transposed),
                )
            new.meta.update(site.node.meta)
            # carried into the joint graph by AOTAutograd, so the memory report can name the layer
            new.meta["custom"] = {**new.meta.get("custom", {}), "shira_layer": layer.name}
            site.node.replace_all_uses_with(new)
            graph.erase_node(site.node)
            touched.add(site.owner)
        report.rewritten.append(layer.name)
        if any(site.path for site in sites):
            report.checkpointed.append(layer.name)
    for module in touched:
        module.graph.lint()
        module.recompile()
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
    """Joint-graph pass: mark the pointwise/view chain that produces
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
            if "recompute" in n.meta:  # inside a checkpointed region: its own policy holds
                continue
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta["ac_graph_id"] = 0
            tagged.add(n)
            if n.target is not _aten.native_layer_norm.default:  # its input is kept anyway
                stack.extend(n.all_input_nodes)
    return len(tagged)


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
    tensor saved for backward (the joint graph's parameters and buffers, `static_inputs`,
    excluded: they are held anyway)."""
    saved = {n.name for n in backward.graph.nodes
             if n.op == "placeholder" and not n.name.startswith("tangents")}
    rebuilt = {n.name for n in backward.graph.nodes if n.op == "call_function"}
    primals = [n for n in joint.graph.nodes if n.op == "placeholder"]
    static = {primals[i].name for i in static_inputs or () if i < len(primals)}
    storages: dict[object, int | None] = {}
    for node in joint.graph.nodes:
        if node.name in saved and node.name not in static:
            key, nbytes = _nbytes(node)
            storages[key] = nbytes
    sizes = list(storages.values())
    report.held_tensors = len(sizes)
    report.held_bytes = None if None in sizes else sum(sizes)
    for node in joint.graph.find_nodes(op="call_function", target=torch.ops.shira_fx.sparse_linear.default):
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
