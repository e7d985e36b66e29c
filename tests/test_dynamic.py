"""Dynamic shapes: batches of varying batch size and sequence length go through one compiled
graph (dynamic=True) or at most one recompile (automatic dynamic), with the values' gradients
equal to eager shira_fx's at every shape."""

from __future__ import annotations

import pytest
import torch

import shira_fx
from tests import tiny_models

SHAPES = [(2, 5), (3, 7), (5, 11), (4, 6), (2, 9)]  # no size 1: Dynamo specialises 0 and 1


def _grads(run, batch, adapter) -> torch.Tensor:
    run(**batch).loss.backward()
    out = torch.cat([la.values.grad.flatten() for la in adapter.layers.values()])
    for la in adapter.layers.values():
        la.values.grad = None
    return out


@pytest.mark.parametrize("dynamic,inner", [
    (True, "aot_eager"), pytest.param(None, "aot_eager", marks=pytest.mark.slow),
    pytest.param(True, "inductor", marks=pytest.mark.slow)])
def test_varying_shapes_compile_once_and_match_eager(dynamic, inner):
    torch._dynamo.reset()
    model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_(std=1e-2)
    adapter.sync()
    backend = shira_fx.backend(inner=inner)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    graphs_per_compile = None
    for i, (size, seq) in enumerate(SHAPES):
        batch = tiny_models.batch("llama", seed=i, size=size, seq=seq)
        got = _grads(compiled, batch, adapter)
        if graphs_per_compile is None:
            graphs_per_compile = len(backend.reports)
        want = _grads(model, batch, adapter)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert all(r.rewritten for r in backend.reports), shira_fx.explain(backend)
    compiles = len(backend.reports) / graphs_per_compile
    # dynamic=True: one compile for every shape; automatic dynamic: the second shape
    # recompiles once with symbolic sizes, then none
    assert compiles == (1 if dynamic else 2), shira_fx.explain(backend)
