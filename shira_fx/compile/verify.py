"""The backend checks the gradients it compiles: on the first call of each compiled training
graph, the values' gradients of that graph are compared with a reference compile of the same
graph (aot_eager: AOTAutograd without a code generator) on the same inputs, before any
optimizer step can use them; a mismatch is refused, naming the layers. `shira_fx.compile.check`
runs the same comparison on a whole model against eager.

Both runs of the first call see clones of the graph's non-parameter inputs (so buffers the
graph updates in place, and earlier graphs' autograd history, are left as they were), the
same random state (restored afterwards) and the same random cotangents; the gradients come
from `torch.autograd.grad`, so nothing accumulates into `.grad`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import registry
from ..errors import ShiraTrainingError

# relative L2 error of a layer's gradient beyond which the compiled graph is refused: far above
# what reassociation costs (fp32 ~1e-6; bf16/fp16 compute ~1e-3), far below what a wrong
# gradient shows (the known Inductor bug: O(1), often all zeros)
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, "low precision": 5e-2}
_CONVS = (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d, torch.conv_transpose1d,
          torch.conv_transpose2d, torch.conv_transpose3d, F.conv_transpose1d, F.conv_transpose2d,
          F.conv_transpose3d, torch.ops.aten.convolution.default)
_RANDOM = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
           torch.dropout, torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
           torch.randint_like, torch.bernoulli, torch.normal, torch.multinomial, torch.randperm)


def holds_convolutions(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in _CONVS for n in gm.graph.nodes)


def draws_random(gm: fx.GraphModule) -> bool:
    """Whether the graph draws random numbers (dropout, rand): Inductor then has to draw them
    as eager does (`fallback_random`) for the comparison to compare like with like."""
    def random(n: fx.Node) -> bool:
        if n.op == "call_method":
            return n.target in ("bernoulli_", "uniform_", "normal_", "random_", "exponential_")
        seeded = isinstance(n.target, torch._ops.OpOverload) and (
            torch.Tag.nondeterministic_seeded in n.target.tags)
        return n.op == "call_function" and (n.target in _RANDOM or seeded)

    return any(random(n) for n in gm.graph.nodes)


def tolerance_for(dtypes: set[torch.dtype]) -> float:
    if dtypes & {torch.bfloat16, torch.float16}:
        return TOLERANCE["low precision"]
    floats = {d for d in dtypes if d.is_floating_point}
    return TOLERANCE[torch.float64] if floats == {torch.float64} else TOLERANCE[torch.float32]


def tolerance(gm: fx.GraphModule, example_inputs: list) -> float:
    """The tolerance for a graph: low-precision compute anywhere in it loosens it."""
    dtypes = {t.dtype for t in example_inputs if isinstance(t, Tensor)}
    for n in gm.graph.nodes:
        val = n.meta.get("example_value")
        if isinstance(val, Tensor):
            dtypes.add(val.dtype)
    return tolerance_for(dtypes)


@dataclass
class LayerCheck:
    """One layer's compiled gradient against the reference: relative L2 error and max abs."""

    name: str
    relative: float
    max_abs: float
    ok: bool


@dataclass
class Verification:
    """What the comparison found, per layer, at `tol`."""

    layers: list[LayerCheck] = field(default_factory=list)
    tol: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.layers)

    def table(self) -> str:
        rows = [f"| {c.name} | {c.relative:.2e} | {c.max_abs:.2e} | {'ok' if c.ok else 'WRONG'} |"
                for c in self.layers]
        return "\n".join(["| layer | relative error | max abs error | |", "|---|---:|---:|---|", *rows])


def compare(names: list[str], got: Iterable[Tensor | None], want: Iterable[Tensor | None],
            tol: float) -> Verification:
    """Per layer: ‖got - want‖ / ‖want‖ (absolute when the reference is zero)."""
    out = Verification(tol=tol)
    for name, g, w in zip(names, got, want, strict=True):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is None:
            out.layers.append(LayerCheck(name, 0.0, 0.0, True))
            continue
        diff = (g.double() - w.double())
        scale = float(w.double().norm())
        relative = float(diff.norm()) / scale if scale > 0 else float(diff.norm())
        ok = math.isfinite(relative) and relative <= tol
        out.layers.append(LayerCheck(name, relative, float(diff.abs().max()) if diff.numel() else 0.0, ok))
    return out


def _values_positions(example_inputs: list) -> list[tuple[int, str]]:
    """(position, layer name) of every prepared layer's values among a graph's inputs."""
    found = []
    for i, t in enumerate(example_inputs):
        layer = registry.layer_for(t)
        if layer is not None and layer.values is t:
            found.append((i, layer.name))
    return found


def _outputs(out) -> list[Tensor]:
    flat = out if isinstance(out, list | tuple) else [out]
    return [t for t in flat if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()]


def _gradients(fn: Callable, args: list, values: list[int], rng: dict) -> list[Tensor | None]:
    """The values' gradients of `fn(*args)` for fixed random cotangents, on clones of every
    non-parameter input, from the random state `rng`."""
    run_args = [t.detach().clone().requires_grad_(t.requires_grad)
                if isinstance(t, Tensor) and not isinstance(t, nn.Parameter) else t for t in args]
    restore_rng(rng)
    out = fn(*run_args)
    outs = _outputs(out)
    wrt = [args[i] for i in values]
    if not outs:
        return [None] * len(wrt)
    g = torch.Generator().manual_seed(0)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float32).to(o) for o in outs]
    grads = torch.autograd.grad(outs, wrt, cotangents, allow_unused=True)
    return [None if x is None else x.detach() for x in grads]


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class FirstCallVerified:
    """A compiled training graph that, on its first call, compares the values' gradients it
    computes with the reference compile's, and refuses (ShiraTrainingError) if they differ;
    until one check passes, every call checks again. Then it is the compiled graph alone."""

    def __init__(self, compiled: Callable, reference: Callable, example_inputs: list, tol: float,
                 hint: str, on_verified: Callable[[Verification], None]):
        self.compiled, self.reference = compiled, reference
        self.positions = _values_positions(example_inputs)
        self.tol, self.hint, self.on_verified = tol, hint, on_verified
        self.verified = not self.positions  # nothing to check: no values are inputs here

    def __call__(self, *args):  # Dynamo calls a backend's graph with the graph's inputs
        if not self.verified:
            self._check(list(args))
        return self.compiled(*args)

    def _check(self, args: list) -> None:
        positions = [i for i, _ in self.positions]
        names = [name for _, name in self.positions]
        rng = rng_state()
        try:
            with torch.enable_grad():
                want = _gradients(self.reference, args, positions, rng)
                got = _gradients(self.compiled, args, positions, rng)
        finally:
            restore_rng(rng)
        found = compare(names, got, want, self.tol)
        if not found.ok:
            wrong = [c for c in found.layers if not c.ok]
            raise ShiraTrainingError(
                f"shira_fx: the compiled graph's gradients differ from the reference's in {len(wrong)} "
                f"of {len(found.layers)} layer(s) (relative error over {self.tol:g}): "
                + "; ".join(f"{c.name}: {c.relative:.3g}" for c in wrong[:8])
                + (" ..." if len(wrong) > 8 else "")
                + f". No optimizer step used them. {self.hint}")
        self.verified = True
        self.reference = None  # its memory goes: later calls are the compiled graph alone
        self.on_verified(found)


def hint(inner: str, convolutions: bool, layout_optimization: bool) -> str:
    """What to tell a user whose compiled graph was refused."""
    known = ("Inductor's layout optimization is known to break convolution gradients on CPU: "
             "torch._inductor.config.layout_optimization = False avoids it (shira_fx turns it off "
             "for graphs with convolutions unless options set it). " if convolutions and layout_optimization
             else "")
    return (f"{known}The inner compiler {inner!r} miscompiled this graph: compile with "
            "shira_fx.backend(inner='aot_eager') (exact), or shira_fx.backend(verify=False) to train "
            "on these gradients anyway")
