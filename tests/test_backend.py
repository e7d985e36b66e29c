"""The backend's pass: what it rewrites, what it leaves, and that it costs no graph break."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import shira_fx
from tests import tiny_models


class GraphSpy:
    """An inner backend that records the graphs it is handed (after the shira_fx pass)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def count(self, target) -> int:
        return sum(n.target is target for gm in self.graphs for n in gm.graph.nodes)


SPARSE = torch.ops.shira_fx.sparse_linear.default


def graph_count(model, b, backend) -> int:
    torch._dynamo.reset()
    counters.clear()
    tiny_models.loss(torch.compile(model, backend=backend), b).backward()
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_the_pass_adds_no_graph_break(kind):
    b = tiny_models.batch(kind)
    plain = graph_count(tiny_models.build(kind), b, "eager")
    model = tiny_models.build(kind)
    shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.05), progress=False)
    assert graph_count(model, b, shira_fx.backend(inner="eager")) == plain


def test_training_graph_gets_sparse_linear_and_no_grad_graph_keeps_dense():
    model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=["q_proj", "v_proj"]),
                               progress=False)
    spy = GraphSpy()
    backend = shira_fx.backend(inner=spy)
    compiled = torch.compile(model, backend=backend)
    b = tiny_models.batch("llama")
    loss = compiled(**b).loss
    assert spy.count(SPARSE) == len(adapter.layers) == 4
    with torch.no_grad():
        eval_loss = compiled(**b).loss
    assert len(spy.graphs) == 2
    assert sum(n.target is SPARSE for n in spy.graphs[1].graph.nodes) == 0
    torch.testing.assert_close(loss.detach(), eval_loss, rtol=1e-6, atol=1e-6)
    report = shira_fx.explain(backend)
    assert "graph 0: rewrote 4" in report and "model.layers.1.self_attn.v_proj" in report
    assert "inference" in report


def test_compiled_forward_equals_eager_forward_on_a_fused_adapter():
    model = tiny_models.build("gpt2")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.uniform_(-0.1, 0.1)
    adapter.sync()
    b = tiny_models.batch("gpt2")
    eager = model(**b).logits
    compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager"))(**b).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


class SharedWeight(nn.Module):
    """Uses fc.weight through the linear *and* directly: the pass must not rewrite it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        return self.other(self.fc(x) + x @ self.fc.weight.t())


def test_layers_the_pass_cannot_take_are_skipped_with_a_reason():
    model = SharedWeight()
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.25), progress=False)
    adapter.layers["other"].values.requires_grad_(False)
    backend = shira_fx.backend(inner="eager")
    torch.compile(model, backend=backend)(torch.randn(3, 8, requires_grad=True)).sum().backward()
    status = backend.layers()
    assert status["fc"].startswith("weight used by")
    assert "do not require grad" in status["other"]


def test_weight_updates_between_calls_need_no_recompile():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager"))

    @shira_fx.train_step(adapter, opt)
    def step(x):
        return compiled(x).pow(2).mean()

    x = torch.randn(5, 24)
    losses = [step(x) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled(x), model(x))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def _value_grads(adapter) -> dict[str, torch.Tensor | None]:
    out = {n: None if la.values.grad is None else la.values.grad.clone() for n, la in adapter.layers.items()}
    for la in adapter.layers.values():
        la.values.grad = None
    return out


def _prepared_blocks(seed: int, n: int = 3):
    torch.manual_seed(seed)
    model = nn.Sequential(*[_Block() for _ in range(n)])
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.2, seed=seed), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_(std=1e-2)
    adapter.sync()
    return model, adapter


@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_blocks_compiled_one_by_one_train_their_own_values(inner):
    """Identical blocks, each compiled on its own (as FSDP2 recipes do): Dynamo would reuse the
    first block's rewritten graph for the others (a parameter is guarded on its shape only),
    training block 0's values with every block's gradient; the layer uid guard prevents it."""
    torch._dynamo.reset()
    model, adapter = _prepared_blocks(0)
    x = torch.randn(4, 16)
    model(x).pow(2).sum().backward()
    want = _value_grads(adapter)
    backend = shira_fx.backend(inner=inner)
    for block in model:
        block.compile(backend=backend)
    model(x).pow(2).sum().backward()
    got = _value_grads(adapter)
    for name in want:
        assert got[name] is not None, f"{name}: no gradient (another block's graph ran)"
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert sorted(n for r in backend.reports for n in r.rewritten) == sorted(adapter.layers)


def test_two_models_through_one_backend_train_their_own_values():
    """A second prepared model of the same architecture compiled with the same backend gets its
    own graph, not the first model's (whose values are baked into it)."""
    torch._dynamo.reset()
    backend = shira_fx.backend(inner="aot_eager")
    x = torch.randn(4, 16)
    runs = []
    for seed in (1, 2):
        model, adapter = _prepared_blocks(seed, n=2)
        model(x).pow(2).sum().backward()
        want = _value_grads(adapter)
        torch.compile(model, backend=backend)(x).pow(2).sum().backward()
        runs.append((want, _value_grads(adapter)))
    for want, got in runs:
        for name in want:
            assert got[name] is not None, name
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert len(backend.reports) == 2


def test_weights_installed_as_graph_attributes_are_recognised():
    """With `inline_inbuilt_nn_modules=False` Dynamo puts parameters into the graph as
    attributes (get_attr) instead of placeholders; the pass finds prepared weights there too."""
    torch._dynamo.reset()
    model, adapter = _prepared_blocks(3)
    x = torch.randn(4, 16)
    model(x).pow(2).sum().backward()
    want = _value_grads(adapter)
    spy = GraphSpy()
    backend = shira_fx.backend(inner=spy)
    with torch._dynamo.config.patch(inline_inbuilt_nn_modules=False):
        torch.compile(model, backend=backend)(x).pow(2).sum().backward()
    got = _value_grads(adapter)
    assert spy.count(SPARSE) == len(adapter.layers)
    assert any(n.op == "get_attr" and n.users and any(u.target is SPARSE for u in n.users)
               for gm in spy.graphs for n in gm.graph.nodes), "the weights were not get_attr nodes"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
