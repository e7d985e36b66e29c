"""The architecture sweep: every model of tests/arch_table.py, prepared with the default targets,
trains through shira_fx eagerly and compiled (aot_eager), and the default targets reach every
weight its forward multiplies by.

The oracle is the unprepared twin (a deep copy taken before `prepare`, holding the same fused
weights): each layer's values' gradient must equal the twin's dense weight gradient gathered
at the layer's indices.

MoE models also adapt their experts' 3-D parameters (`target_parameters`). A case that fails
is a strict xfail whose reason names the cause (none today). The sweep takes ~9 minutes on 2
CPU cores, almost all of it compiling the aot_eager cases (~8-20 s each).
"""

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import shira_fx
from shira_fx.targets import is_linear_like
from tests.arch_table import ARCHS, Arch

pytestmark = pytest.mark.slow

MODES = ("eager", "aot_eager")
CONFIG = dict(density=0.1, seed=3)  # a few positions in every layer of these tiny models
TOLERANCE = 1e-5


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]  # the 3-D expert parameters of MoE models


def config_for(arch: Arch) -> shira_fx.ShiraConfig:
    """Default targets; MoE models also adapt their experts."""
    experts = {"target_parameters": EXPERTS} if arch.family == "moe" or arch.name == "jamba" else {}
    return shira_fx.ShiraConfig(**CONFIG, **experts)


def twin_weight(twin: nn.Module, layer) -> Tensor:
    """The unprepared twin's tensor of an adapted layer: a linear's weight or a 3-D parameter."""
    if layer.param == "weight":
        return dict(twin.named_modules())[layer.name].weight
    return twin.get_parameter(layer.name)


def prepared_with_twin(arch: Arch) -> tuple[nn.Module, nn.Module, shira_fx.SparseAdapter]:
    """(prepared model, unprepared twin with the same fused weights, adapter). The values are
    non-zero, so the gradient is taken at base + values, not at the base."""
    model = arch.build()
    twin = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, config_for(arch), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_(0, 0.05)
    adapter.sync()
    twin.load_state_dict(model.state_dict())
    return model, twin, adapter


def masked_dense_grads(twin: nn.Module, adapter, arch: Arch, batch: dict) -> dict[str, Tensor]:
    """The twin's dense weight gradient of every adapted layer, gathered at its indices."""
    for p in twin.parameters():
        p.requires_grad_(True)
    arch.loss(twin, batch).backward()
    unused = [name for name, layer in adapter.layers.items() if twin_weight(twin, layer).grad is None]
    assert not unused, f"the batch never reaches {unused}: the table entry should use them"
    return {name: twin_weight(twin, layer).grad.view(-1)[layer.indices.long()]
            for name, layer in adapter.layers.items()}


def gradient_faults(adapter, expected: dict[str, Tensor], status: dict[str, str]) -> list[str]:
    """Every adapted layer whose values got no gradient or a wrong one, with the backend's
    account of the layer when compiled."""
    faults = []
    for name, layer in adapter.layers.items():
        why = f" [backend: {status[name]}]" if name in status else ""
        if layer.values.grad is None:
            faults.append(f"{name}: no gradient{why}")
        elif (err := rel_err(layer.values.grad, expected[name])) > TOLERANCE:
            faults.append(f"{name}: relative error {err:.2e}{why}")
    return faults


# ---- expected failures: each names its cause (none today) ------------------------------------

GRADIENT_XFAILS: dict[tuple[str, str], str] = {}
COVERAGE_XFAILS: dict[str, str] = {}


def case(arch: Arch, *more: str, xfail: str | None) -> pytest.param:
    """One parametrised case, id `<arch>[-<mode>]`: skipped when the table says so, xfail
    (strict) when `xfail` names why it fails today."""
    marks = [pytest.mark.skip(reason=arch.skip)] if arch.skip else []
    if xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=xfail))
    return pytest.param(arch, *more, id="-".join((arch.name, *more)), marks=marks)


GRADIENT_CASES = [case(arch, mode, xfail=GRADIENT_XFAILS.get((arch.name, mode)))
                  for arch in ARCHS for mode in MODES]
COVERAGE_CASES = [case(arch, xfail=COVERAGE_XFAILS.get(arch.name)) for arch in ARCHS]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("arch, mode", GRADIENT_CASES)
def test_values_grad_equals_masked_dense_grad(arch: Arch, mode: str, fresh_dynamo):
    model, twin, adapter = prepared_with_twin(arch)
    batch = arch.batch()
    expected = masked_dense_grads(twin, adapter, arch, batch)

    backend = shira_fx.backend(inner=mode) if mode != "eager" else None
    run = model if backend is None else torch.compile(model, backend=backend)
    loss = arch.loss(run, batch)
    if loss.requires_grad:  # else no layer's values reached the loss: every layer is a fault
        loss.backward()

    status = backend.layers() if backend is not None else {}
    faults = gradient_faults(adapter, expected, status)
    assert not faults, f"{arch.name} ({mode}), {len(faults)}/{len(adapter.layers)} layers:\n" + \
        "\n".join(faults)
    values = {id(la.values) for la in adapter.layers.values()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in values), \
        "the frozen base got a gradient"


# ---- coverage: the default targets reach every weight the forward multiplies by --------------

_aten = torch.ops.aten
MATMULS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.addbmm, _aten.mv, _aten.addmv,
           _aten.matmul, _aten.linear, _aten._grouped_mm}


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class MatmulOperands(TorchDispatchMode):
    """Records the storage of every tensor a matrix product reads."""

    def __init__(self):
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATMULS:
            self.storages.update(_storage(a) for a in args if isinstance(a, Tensor) and a.numel())
        return func(*args, **(kwargs or {}))


def multiplied_parameters(model: nn.Module, arch: Arch, batch: dict) -> dict[int, str]:
    """storage -> name of every weight (a parameter of 2 or more dimensions: biases apart) that
    a matrix product of the forward reads, as itself or a view: a transposed weight, one
    expert's slice of a 3-D parameter."""
    with MatmulOperands() as seen:
        arch.loss(model, batch)
    return {_storage(p): name for name, p in model.named_parameters()
            if p.dim() >= 2 and _storage(p) in seen.storages}


def left_out_on_purpose(model: nn.Module, adapter) -> set[int]:
    """Storages of the weights the default targets leave out on purpose: linears the rule leaves
    out (output heads and task heads, weights tied to an embedding), every weight of a pooler
    (`*Pooler`, `*PoolingHead`) and the routers of MoE models (`*Router`: a few hundred
    numbers that pick the experts, not what an adapter is for)."""
    adapted = {id(layer.module) for layer in adapter.layers.values()}
    out = {_storage(m._parameters["weight"]) for m in model.modules()
           if is_linear_like(m) and id(m) not in adapted}
    for m in model.modules():
        if type(m).__name__.endswith(("Pooler", "PoolingHead", "Router")):
            out |= {_storage(p) for p in m.parameters()}
    return out


@pytest.mark.parametrize("arch", COVERAGE_CASES)
def test_default_targets_reach_every_multiplied_weight(arch: Arch):
    model = arch.build()
    multiplied = multiplied_parameters(model, arch, arch.batch())
    adapter = shira_fx.prepare(model, config_for(arch), progress=False)
    reached = {_storage(layer.weight) for layer in adapter.layers.values()}
    heads = left_out_on_purpose(model, adapter)
    missed = sorted(name for storage, name in multiplied.items() if storage not in reached | heads)
    assert not missed, f"{arch.name}: the forward multiplies by weights no layer adapts: {missed}"
