"""AdapterBank: exact switching and fusion, validation before mutation, compiled serving,
PEFT interop."""

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import shira_fx
from shira_fx.memory import LiveTensorTracker
from tests import file_kit, tiny_models
from tests.conftest import budget


def random_adapter(kind="llama", seed=0, **cfg):
    """A SparseAdapter with random values, prepared on a fresh copy of the seed-0 base."""
    model = tiny_models.build(kind)
    cfg.setdefault("density", 0.05)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(seed=seed, **cfg), progress=False)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.1)
    return adapter


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, name in enumerate(["a", "b", "c"]):
        paths[name] = folder / f"{name}.safetensors"
        random_adapter(seed=i).save(paths[name])
    return paths


def dense_reference(base: dict, adapters: dict, spec: dict) -> dict:
    """From scratch: base + Σ wᵢ·deltaᵢ (fp32, added in adapter-name order) on the union."""
    out = {k: v.clone() for k, v in base.items()}
    per_layer = {}
    for name in sorted(spec):
        for ln, la in adapters[name].layers.items():
            acc, mask = per_layer.setdefault(ln, (torch.zeros(la.weight.numel()),
                                                  torch.zeros(la.weight.numel(), dtype=torch.bool)))
            acc.index_add_(0, la.indices.long(), la.values.detach() * spec[name])
            mask[la.indices.long()] = True
    for ln, (acc, mask) in per_layer.items():
        w = out[f"{ln}.weight"].view(-1)
        w[mask] = (w[mask].float() + acc[mask]).to(w.dtype)
    return out


class BankMachine(RuleBasedStateMachine):
    """Random load / activate / fuse / deactivate / unload sequences; after every step the
    weights equal the dense reference, and with nothing active they equal the base bit-exactly."""

    adapters = {n: random_adapter(seed=i) for i, n in enumerate(["a", "b", "c", "d"])}
    steps = 0

    def __init__(self):
        super().__init__()
        self.model = tiny_models.build("llama")
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.bank = shira_fx.AdapterBank(self.model)
        self.spec = None

    @rule(name=st.sampled_from("abcd"))
    def load(self, name):
        if name in self.bank:
            with pytest.raises(shira_fx.ShiraAdapterError, match="already loaded"):
                self.bank.load(name, self.adapters[name])
        else:
            self.bank.load(name, self.adapters[name])

    @precondition(lambda self: self.bank.names)
    @rule(data=st.data())
    def activate(self, data):
        name = data.draw(st.sampled_from(self.bank.names))
        self.bank.activate(name)
        self.spec = {name: 1.0}

    @precondition(lambda self: len(self.bank.names) >= 2)
    @rule(data=st.data())
    def fuse(self, data):
        names = data.draw(st.lists(st.sampled_from(self.bank.names), min_size=2, max_size=3,
                                   unique=True))
        weights = data.draw(st.lists(st.sampled_from([1.0, 0.7, -0.5, 0.25]),
                                     min_size=len(names), max_size=len(names)))
        spec = dict(zip(names, weights, strict=True))
        self.bank.activate(spec)
        self.spec = spec

    @rule()
    def deactivate(self):
        self.bank.deactivate()
        self.spec = None

    @precondition(lambda self: self.bank.names)
    @rule(data=st.data())
    def unload(self, data):
        name = data.draw(st.sampled_from(self.bank.names))
        self.bank.unload(name)
        if self.spec is not None and name in self.spec:
            self.spec = None

    @rule()
    def activate_unknown_changes_nothing(self):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        with pytest.raises(shira_fx.ShiraAdapterError, match="not loaded"):
            self.bank.activate({"a": 1.0, "zzz": 1.0})
        for k, v in self.model.state_dict().items():
            assert torch.equal(v, before[k])

    @invariant()
    def weights_match_reference(self):
        BankMachine.steps += 1
        assert self.bank.active == self.spec
        expected = self.base if self.spec is None else dense_reference(self.base, self.adapters,
                                                                        self.spec)
        for k, v in self.model.state_dict().items():
            assert torch.equal(v, expected[k]), k


@pytest.mark.fuzz
def test_restore_is_bit_exact_after_any_switch_sequence():
    BankMachine.steps = 0
    run_state_machine_as_test(
        BankMachine, settings=settings(max_examples=budget(30, 3), stateful_step_count=50, deadline=None)
    )
    assert BankMachine.steps >= 50 * budget(30, 3) * 2 // 3  # 1,000 in the slow tier


def test_activate_touches_only_masked_elements(adapter_files):
    model = tiny_models.build("llama")
    bank = shira_fx.AdapterBank(model)
    for name, path in adapter_files.items():
        bank.load(name, path)
    bank.activate({"a": 1.0, "b": 0.5})  # build the plans once
    bank.activate("c")
    smallest = min(m.weight.numel() for n, m in model.named_modules()
                   if n in shira_fx.load_adapter(adapter_files["a"]).layers)
    with LiveTensorTracker() as tracker:
        bank.activate({"a": 1.0, "b": 0.5})
        bank.activate("c")
        bank.deactivate()
    largest = tracker.largest()
    assert largest is None or largest.numel < smallest


def test_overlap_counts_shared_positions():
    model = tiny_models.build("llama")
    bank = shira_fx.AdapterBank(model)
    a, b = random_adapter(seed=0), random_adapter(seed=1)
    bank.load("a", a)
    bank.load("b", b)
    bank.load("a_again", a)
    expected = sum(int(torch.isin(la.indices, b.layers[n].indices).sum()) for n, la in a.layers.items())
    assert bank.overlap("a", "b") == expected
    assert bank.overlap("a", "a_again") == a.num_trainable()
    assert 0 < expected < 0.2 * a.num_trainable()  # random 5 % masks barely overlap


def test_compiled_inference_switches_without_recompiling(adapter_files):
    from torch._dynamo.utils import counters

    model = tiny_models.build("llama").eval()
    eager = copy.deepcopy(model)
    bank, ref_bank = shira_fx.AdapterBank(model), shira_fx.AdapterBank(eager)
    for name, path in adapter_files.items():
        bank.load(name, path)
        ref_bank.load(name, path)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager"))
    ids = tiny_models.batch("llama")["input_ids"]
    specs = ["a", "b", {"a": 1.0, "c": 0.7}, "c", None]
    with torch.no_grad():
        for i in range(50):
            spec = specs[i % len(specs)]
            for b in (bank, ref_bank):
                b.deactivate() if spec is None else b.activate(spec)
            torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


def test_compiled_switch_then_forward_does_not_clone_the_weight():
    from torch._inductor.utils import run_and_get_code

    lin = torch.nn.Linear(64, 64, bias=False).requires_grad_(False)
    idx = torch.arange(0, 4096, 37)
    base = lin.weight.view(-1)[idx].clone()
    src = base + 1.0

    def serve(x, w, i, s):
        torch.ops.shira_fx.scatter_([w], [i], [s], [], 1.0)
        return x @ w.t()

    x = torch.randn(3, 64)
    out, (code, *_) = run_and_get_code(torch.compile(serve), x, lin.weight, idx, src)
    torch.testing.assert_close(out, x @ lin.weight.t())
    assert torch.equal(lin.weight.view(-1)[idx], src)
    call = code[code.index("def call("):]
    assert "clone" not in call and "shira_fx.scatter_" in call


# -- validation: every corrupt input is refused before any weight changes ----------------
def _corrupt_v1(raw: bytes, how: str) -> bytes:
    from safetensors.torch import load, save

    tensors, meta = load(raw), file_kit.header(raw)[0]["__metadata__"]
    layers = json.loads(meta["layers"])
    first = sorted(layers)[0]
    if how == "nan":
        tensors[f"{first}.values"][3] = float("nan")
    elif how == "unsorted":
        tensors[f"{first}.indices"] = tensors[f"{first}.indices"].flip(0).contiguous()
    elif how == "duplicate":
        tensors[f"{first}.indices"][1] = tensors[f"{first}.indices"][0]
    elif how == "out_of_range":
        tensors[f"{first}.indices"][-1] = 10**8
    elif how == "wrong_layer":
        layers["model.layers.9.mlp.up_proj"] = layers.pop(first)
        tensors["model.layers.9.mlp.up_proj.indices"] = tensors.pop(f"{first}.indices")
        tensors["model.layers.9.mlp.up_proj.values"] = tensors.pop(f"{first}.values")
    elif how == "wrong_shape":
        layers[first]["shape"] = [layers[first]["shape"][1], layers[first]["shape"][0] + 1]
    elif how == "wrong_dtype":
        tensors[f"{first}.values"] = tensors[f"{first}.values"].to(torch.int32)
    elif how == "missing_tensor":
        del tensors[f"{first}.values"]
    elif how == "fingerprint":
        layers[first]["fingerprint"] = "0" * 64
    meta["layers"] = "{not json" if how == "bad_json" else json.dumps(layers)
    return save(tensors, metadata=meta)


def _corrupt_v2(raw: bytes, how: str) -> bytes:
    """The first layer's index code replaced by a hostile one whose checksum matches what it
    decodes to (so the decoder's own checks must refuse it), or the table or tensors edited."""
    from shira_fx.index_codes import IndexCode, checksum, decode

    f = file_kit.V2(raw)
    idx = decode(f.code(0), f.codes[0], f.table["nnz"][0], tuple(f.table["shape"][0]), False,
                 f.table["name"][0], json.loads(f.meta["config"])["seed"]).numpy()
    hostile = {"unsorted": idx[::-1], "duplicate": np.concatenate([idx[:1], idx[:-1]]),
               "out_of_range": np.concatenate([idx[:-1], [10**8]])}
    if how in hostile:
        x = hostile[how].astype("<i4")
        f.set_code(0, IndexCode("int32", [], checksum(x)), x.view(np.uint8))
    elif how == "nan":
        f.values[0][3] = float("nan")
    elif how == "wrong_layer":
        f.table["name"][0] = "model.layers.9.mlp.up_proj"
    elif how == "wrong_shape":
        f.table["shape"][0] = f.table["shape"][0][::-1][:1] + [f.table["shape"][0][0] + 1]
    elif how == "wrong_dtype":
        f.values = [v.to(torch.int32) for v in f.values]
    elif how == "fingerprint":
        f.table["fingerprint"][0] = "0" * 32
    elif how == "checksum":
        f.table["check"][0] = "0" * 16
    elif how == "seed":  # a rand recipe regenerated with another seed
        f.meta["config"] = json.dumps({**json.loads(f.meta["config"]), "seed": 99})
    data = f.bytes("{not json" if how == "bad_json" else None)
    if how == "missing_tensor":
        head, body = file_kit.header(data)
        del head["values"]
        data = file_kit.join(head, body)
    return data


COMMON = {
    "truncated": "truncated or corrupt", "garbage": "truncated or corrupt", "nan": "NaN",
    "unsorted": "not sorted", "duplicate": "not sorted", "wrong_layer": "another model",
    "wrong_shape": "weight shape", "bad_json": "malformed", "missing_tensor": "missing",
    "fingerprint": "another base model",
}
CORRUPTIONS = {
    "v1": {**COMMON, "duplicate": "not sorted and unique", "out_of_range": "out of range",
           "wrong_dtype": "I32/I64|F32/F64"},
    "v2": {**COMMON, "out_of_range": "in \\[0, ", "wrong_dtype": "F32/F64/BF16/F16",
           "checksum": "regenerated from its recipe", "seed": "regenerated from its recipe"},
}


@pytest.mark.parametrize("version,how", [(v, h) for v in CORRUPTIONS for h in sorted(CORRUPTIONS[v])])
def test_corrupt_adapter_is_refused_and_the_model_is_unchanged(adapter_files, tmp_path, version, how):
    model = tiny_models.build("llama")
    bank = shira_fx.AdapterBank(model)
    bank.load("b", adapter_files["b"])
    bank.activate("b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    raw = adapter_files["a"].read_bytes() if version == "v2" else file_kit.v1_bytes(random_adapter(seed=0))
    if how == "truncated":
        raw = raw[: len(raw) - 50]
    elif how == "garbage":
        raw = b"\x00" * 64
    else:
        raw = (_corrupt_v1 if version == "v1" else _corrupt_v2)(raw, how)
    bad = tmp_path / f"{version}-{how}.safetensors"
    bad.write_bytes(raw)
    with pytest.raises(shira_fx.ShiraAdapterError, match=CORRUPTIONS[version][how]) as info:
        bank.load("a", bad)
    assert str(bad) in str(info.value)
    assert "a" not in bank and bank.active == {"b": 1.0}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_for_another_model_is_refused(adapter_files):
    other = tiny_models.build("llama", seed=7)  # same architecture, other weights
    with pytest.raises(shira_fx.ShiraAdapterError, match="another base model"):
        shira_fx.AdapterBank(other).load("a", adapter_files["a"])
    gpt2 = tiny_models.build("gpt2")
    with pytest.raises(shira_fx.ShiraAdapterError, match="another model"):
        shira_fx.AdapterBank(gpt2).load("a", adapter_files["a"])


def test_loading_while_active_reads_the_true_base(adapter_files):
    model = tiny_models.build("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    bank = shira_fx.AdapterBank(model)
    bank.load("a", adapter_files["a"])
    bank.activate("a")
    bank.load("b", adapter_files["b"])  # overlaps "a": fingerprint must see the base there
    bank.activate("b")
    bank.deactivate()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


# -- PEFT interop ----------------------------------------------------------------------------
def test_peft_shira_directory_loads_and_matches_peft_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = peft.get_peft_model(tiny_models.build("llama"),
                                     peft.ShiraConfig(r=2, target_modules=targets, init_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = tiny_models.batch("llama")["input_ids"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    model = tiny_models.build("llama")
    bank = shira_fx.AdapterBank(model)
    bank.load("p", tmp_path / "peft")
    bank.activate("p")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [{"r": 2, "density": None}, {"density": 0.07}], ids=["r", "density"])
def test_to_peft_writes_a_directory_peft_loads_with_the_same_outputs(tmp_path, budget):
    """PEFT holds r*(out+in) values per layer: an adapter sized by density is padded with zero
    values at unused positions, so PEFT's merged model still computes exactly what it does."""
    peft = pytest.importorskip("peft")
    adapter = random_adapter(**budget, target_modules=["q_proj", "o_proj", "up_proj"])
    adapter.sync()
    r = adapter.to_peft(tmp_path / "out")
    assert r == (2 if "r" in budget else max(
        -(-la.indices.numel() // sum(la.shape)) for la in adapter.layers.values()))
    loaded = peft.PeftModel.from_pretrained(tiny_models.build("llama"), tmp_path / "out")
    ids = tiny_models.batch("llama")["input_ids"]
    fused = tiny_models.build("llama")
    bank = shira_fx.AdapterBank(fused)
    bank.load("x", adapter)
    bank.activate("x")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, fused(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_to_peft_refuses_what_peft_cannot_hold(tmp_path):
    with pytest.raises(shira_fx.ShiraAdapterError, match="Conv1D"):
        random_adapter("gpt2", r=1, density=None).to_peft(tmp_path / "y")
