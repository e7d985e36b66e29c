"""The backend's pass: what it rewrites, what it leaves, and that it costs no graph break."""

import copy
import warnings

import pytest
import torch
from torch import fx, nn
from torch._dynamo.utils import counters

import shira_fx
from shira_fx.compile import rewrite as passes
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


@pytest.mark.parametrize("kind", [pytest.param("gpt2", marks=pytest.mark.slow), "bert"])
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
    assert "graph 0: 4 layer(s) train through" in report and "model.layers.1.self_attn.v_proj" in report
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
    """Uses fc.weight through the linear *and* directly, in the three forms models use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        w = self.fc.weight
        return self.other(self.fc(x) + x @ w.t() + x @ w.T + (w @ x.t()).t())


def test_a_weight_also_read_directly_gets_the_gradient_of_every_use():
    torch._dynamo.reset()
    model = SharedWeight()
    ref = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.25), progress=False)
    adapter.layers["other"].values.requires_grad_(False)
    x = torch.randn(3, 8)
    ref(x).sum().backward()
    backend = shira_fx.backend(inner="aot_eager")
    torch.compile(model, backend=backend)(x).sum().backward()
    status = backend.layers()
    assert status["fc"] == "rewritten" and "fc" in backend.reports[0].direct
    assert "do not require grad" in status["other"]
    idx = adapter.layers["fc"].indices.long()
    torch.testing.assert_close(adapter.layers["fc"].values.grad, ref.fc.weight.grad.view(-1)[idx],
                               rtol=1e-5, atol=1e-6)


class ReadsOnlyTheWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):  # fc's forward never runs: its values are not in the graph
        return self.gate(x) * torch.tanh(x @ self.fc.weight.t().contiguous())


@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
def test_a_weight_read_only_outside_its_forward_still_trains_exactly(mode):
    """fc's forward never runs; its weight is read directly (as Mamba reads dt_proj.weight):
    the read goes through the adapter, so the values get exactly the gradient at the mask."""
    torch._dynamo.reset()
    model = ReadsOnlyTheWeight()
    ref = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.25), progress=False)
    x = torch.randn(3, 8)
    ref(x).sum().backward()
    backend = shira_fx.backend(inner="aot_eager")
    run = model if mode == "eager" else torch.compile(model, backend=backend)
    run(x).sum().backward()
    for name in ("fc", "gate"):
        layer = adapter.layers[name]
        want = getattr(ref, name).weight.grad.view(-1)[layer.indices.long()]
        torch.testing.assert_close(layer.values.grad, want, rtol=1e-5, atol=1e-6, msg=name)
    if mode != "eager":
        assert backend.layers()["fc"] == "rewritten"


def test_a_raw_weight_use_the_pass_cannot_route_is_refused_naming_the_layer():
    """On a hand-built graph where a prepared weight feeds an op the pass does not know and the
    layer's values are not in the graph, the pass refuses rather than lose that gradient."""
    model = nn.Sequential(nn.Linear(6, 5))
    shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.3), progress=False)
    root = nn.Module()
    root.w = model[0]._parameters["weight"]  # the raw weight (`.weight` reads through the adapter)
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (x, w)))
    with pytest.raises(shira_fx.ShiraTrainingError, match="0: its weight is read by mul"):
        passes.rewrite_sparse_linears(fx.GraphModule(root, graph), [])


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
    """Identical blocks, each compiled on its own (as FSDP2 recipes do): Dynamo reuses the
    first block's graph for the others, and since the values and indices are graph inputs
    (never baked into the graph), every block still trains its own values."""
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
    assert {n for r in backend.reports for n in r.rewritten} >= {"0.a", "0.b"}


def test_two_models_through_one_backend_train_their_own_values():
    """A second prepared model of the same architecture compiled with the same backend trains
    its own values, whether or not it reuses the first model's graph."""
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
    assert len(backend.reports) >= 1


class CountingSpy(GraphSpy):
    """An inner backend that counts how often its compiled graphs run."""

    runs = 0

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


@pytest.mark.parametrize("masks", [("rand", "struct")])
def test_regional_compilation_compiles_one_block_graph_for_twelve_blocks(masks):
    """Regional compilation (each block compiled on its own): at most 2 graphs for 12 blocks,
    every block runs compiled, and the values' gradients equal the eager model's; again after
    remove() and a second prepare with another mask."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(*[_Block() for _ in range(12)])
    x = torch.randn(4, 16)
    for mask in masks:
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.2, mask=mask), progress=False)
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.values.normal_(std=1e-2)
        adapter.sync()
        model(x).pow(2).sum().backward()
        want = _value_grads(adapter)
        counters.clear()
        spy = CountingSpy()
        backend = shira_fx.backend(inner=spy, verify=False)  # counts the graphs' own runs only
        for block in model:
            block.compile(backend=backend)
        model(x).pow(2).sum().backward()
        got = _value_grads(adapter)
        assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
        assert spy.runs == 12, "a block ran uncompiled"
        for name in want:
            assert got[name] is not None, f"{name}: no gradient"
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
        for block in model:  # back to the eager blocks for the next round
            block._compiled_call_impl = None
        adapter.remove()
        torch._dynamo.reset()


def test_the_pass_rewrites_a_direct_use_on_a_hand_built_graph_with_get_attr_tensors():
    """The pass on a graph built by hand: the weight, values and indices as get_attr nodes (as
    a graph module holding them), the weight used by a plain `linear`, which becomes
    `sparse_linear` with that layer's values and indices."""
    model = nn.Sequential(nn.Linear(6, 5))
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.3), progress=False)
    layer = adapter.layers["0"]
    root = nn.Module()
    root.w, root.v = layer.weight, layer.values
    root.register_buffer("i", layer.indices)
    graph = fx.Graph()
    x = graph.placeholder("x")
    w, v, i = (graph.get_attr(name) for name in ("w", "v", "i"))
    y = graph.call_function(torch._C._nn.linear, (x, w, None))
    graph.call_function(torch.ops.aten.sum.default, (v,))  # the values read, as a forward would
    graph.call_function(torch.ops.aten.sum.default, (i,))
    graph.output(y)
    gm = fx.GraphModule(root, graph)
    report = passes.rewrite_sparse_linears(gm, [])
    assert report.rewritten == ["0"] and report.direct == ["0"]
    (node,) = [n for n in gm.graph.nodes if n.target is SPARSE]
    assert node.args[1:5] == (w, None, v, i)
    xin = torch.randn(4, 6, requires_grad=True)
    gm(xin).pow(2).sum().backward()
    ref = xin.detach().requires_grad_()
    wref = model[0].weight.detach().clone().requires_grad_()
    torch.nn.functional.linear(ref, wref).pow(2).sum().backward()
    torch.testing.assert_close(layer.values.grad, wref.grad.view(-1)[layer.indices.long()])


def test_a_twelve_block_llama_compiled_block_by_block_compiles_two_graphs():
    """transformers' own Llama, each decoder layer compiled on its own (without a KV cache,
    whose per-layer state Dynamo would guard on): two graphs serve all twelve blocks, and every
    layer's values get the masked dense gradient."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=12, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))
    ref = copy.deepcopy(model)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    backend = shira_fx.backend(inner="aot_eager")
    for layer in model.model.layers:
        layer.compile(backend=backend)
    counters.clear()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    modules = dict(ref.named_modules())
    for name, layer in adapter.layers.items():
        want = modules[name].weight.grad.view(-1)[layer.indices.long()]
        torch.testing.assert_close(layer.values.grad, want, rtol=1e-5, atol=1e-7, msg=name)


class _EagerLayers(torch.nn.Module):
    """A model whose prepared layers Dynamo cannot trace (they run in a disabled function)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        return _run_eagerly(self.a, self.norm(x)).pow(2).mean()


@torch.compiler.disable
def _run_eagerly(module, x):
    return module(x)


def test_a_compiled_model_whose_graphs_hold_no_layer_is_reported_at_the_first_step():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _EagerLayers()
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=["a"], density=0.5), progress=False)
    compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager"))
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    compiled(torch.randn(4, 8)).backward()
    with pytest.warns(shira_fx.ShiraWarning, match=r"none holds any of its 1 prepared layers.*disable"):
        opt.step()
    assert model.a.shira_values.abs().sum() > 0  # it trained, eagerly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later steps say nothing
        compiled(torch.randn(4, 8)).backward()
        opt.step()


def test_compiled_and_eager_models_that_train_their_layers_are_not_reported():
    for compile_it in (False, True):
        torch._dynamo.reset()
        model = tiny_models.build("mlp")
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
        run = torch.compile(model, backend=shira_fx.backend(inner="aot_eager")) if compile_it else model
        opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
        run(torch.randn(4, 24)).pow(2).mean().backward()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt.step()
        reported = [str(w.message) for w in seen if issubclass(w.category, shira_fx.ShiraWarning)]
        assert reported == [], (compile_it, reported)
        assert all(layer.values.abs().sum() > 0 for layer in adapter.layers.values()), compile_it


@pytest.mark.parametrize("family, mask", [("llama", "rand"), ("gpt2", "struct")])
def test_explain_names_the_path_of_each_layers_masked_gradient(family, mask):
    """Per layer, explain says how backward computes the values' gradient: the structure's dense
    lines, and for the rest the path the dispatcher's cost model picks at that shape, and why."""
    from shira_fx.kernels.masked_sddmm import PATHS, choose_path

    model = tiny_models.build(family)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1, mask=mask), progress=False)
    backend = shira_fx.backend(inner="aot_eager")
    b = tiny_models.batch(family, size=4, seq=24)
    tiny_models.loss(torch.compile(model, backend=backend), b).backward()
    report = backend.reports[0]
    assert set(report.gradients) == set(adapter.layers)
    text = shira_fx.explain(backend)
    for name, how in report.gradients.items():
        assert f"masked gradient at T={4 * 24} of " in how and how in text
        layer = adapter.layers[name]
        rows, cols = model.get_submodule(name).weight.shape
        if mask == "struct":  # GPT-2 stores (in, out): struct's rows are whole stored columns
            assert "dense column(s) as one GEMM" in how and "diagonal element(s) streamed" in how, how
        else:
            path = choose_path("cpu", torch.float32, torch.float32, 4 * 24, rows, cols,
                               layer.indices.numel(), None)
            assert path in PATHS and f"other element(s) by {path}, the cheapest estimate" in how, how
