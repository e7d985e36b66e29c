"""Many adapters in one batch (`bank.per_request`): each row computes with its own adapter (or
fusion, or the base) through the sparse side path, eager and compiled, without recompiling
for a new list of names and without changing the weights."""

from __future__ import annotations

import threading

import pytest
import torch
from torch._dynamo.utils import counters

import shira_fx
from shira_fx.kernels import side
from shira_fx.serve import mixed as mixed_batches
from tests import tiny_models
from tests.thread_helpers import join, start, until

B, SEQ = 6, 7


def trained_adapters(tmp_path, n: int = 3) -> list:
    """n adapters of the tiny Llama with random values, saved; returns their paths."""
    paths = []
    for seed in range(n):
        model = tiny_models.build("llama")
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.05, seed=seed), progress=False)
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.2)
        path = tmp_path / f"a{seed}.safetensors"
        adapter.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def bank(tmp_path):
    model = tiny_models.build("llama").eval()
    bank = shira_fx.AdapterBank(model)
    for i, path in enumerate(trained_adapters(tmp_path)):
        bank.load(f"a{i}", path)
    return bank


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, tiny_models.VOCAB, (B, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _alone(bank, ids: torch.Tensor, spec) -> torch.Tensor:
    """The logits of `ids` with `spec` activated the usual way (fused), then restored."""
    bank.activate(spec) if spec is not None else bank.deactivate()
    out = bank.model(input_ids=ids).logits
    bank.deactivate()
    return out


NAMES = ["a0", None, "a2", {"a0": 1.0, "a1": 0.5}, "a1", "a0"]


@pytest.mark.parametrize("copy_at", [0.0, float("inf")], ids=["weight-copy", "sparse-side"])
@pytest.mark.parametrize("active", [None, "a1"])
def test_each_row_equals_its_adapter_computed_alone(bank, active, copy_at, monkeypatch):
    """Both ways a CPU mixed batch runs an adapter's rows: on a copy of the weight with the
    correction written in, and as the weight's product plus the sparse side product."""
    monkeypatch.setattr(side, "DENSE_COPY_TOKENS_X_NNZ", copy_at)
    ids = _ids()
    want = torch.stack([_alone(bank, ids, spec)[i] for i, spec in enumerate(NAMES)])
    if active is not None:
        bank.activate(active)
    before = {k: v.clone() for k, v in bank.model.state_dict().items()}
    with torch.no_grad(), bank.per_request(NAMES) as model:
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for k, v in bank.model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert bank.active == (None if active is None else {active: 1.0})


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("copy_at", [0.0, float("inf")])
def test_request_linear_equals_each_rows_dense_weight(transposed, copy_at, monkeypatch):
    """The op alone against its definition: row b times (W + its correction, scattered into a
    dense copy), for weights stored (out, in) and (in, out); an unknown adapter id is refused."""
    monkeypatch.setattr(side, "DENSE_COPY_TOKENS_X_NNZ", copy_at)
    g = torch.Generator().manual_seed(0)
    out_f, in_f, rows = 9, 5, [1, -1, 0, 1, 2]
    weight = torch.randn((in_f, out_f) if transposed else (out_f, in_f), generator=g)
    bias = torch.randn(out_f, generator=g)
    parts = [torch.randperm(out_f * in_f, generator=g)[:n].sort().values for n in (4, 11, 0)]
    values = [torch.randn(p.numel(), generator=g) for p in parts]
    offsets = torch.tensor([0, 4, 15, 15])
    x = torch.randn(len(rows), 3, in_f, generator=g)
    got = shira_fx.ops.request_linear(x, weight, bias, torch.tensor(rows), torch.cat(parts).int(),
                                      torch.cat(values), offsets, transposed)
    for b, a in enumerate(rows):
        w = weight.clone()
        if a >= 0:
            w.view(-1)[parts[a]] += values[a]
        want = x[b] @ (w if transposed else w.T) + bias
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5, msg=f"row {b}")
    with pytest.raises(ValueError, match="row 0 names adapter 3"):
        shira_fx.ops.request_linear(x[:1], weight, bias, torch.tensor([3]), torch.cat(parts).int(),
                                    torch.cat(values), offsets, transposed)


def test_compiled_mixed_batches_match_and_a_new_list_of_names_compiles_nothing(bank):
    torch._dynamo.reset()
    compiled = torch.compile(bank.model, backend=shira_fx.backend(inner="aot_eager"))
    ids = _ids(1)
    lists = [NAMES, ["a2"] * B, [None, "a1", "a1", "a0", None, "a2"]]
    with torch.no_grad(), bank.per_request(lists[0]):
        compiled(input_ids=ids)  # compile once
    counters.clear()
    for names in lists:
        want = torch.stack([_alone(bank, ids, spec)[i] for i, spec in enumerate(names)])
        with torch.no_grad(), bank.per_request(names):
            got = compiled(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])


def test_the_packed_table_is_reused_only_while_it_still_holds(bank, tmp_path):
    """A batch served like the last one reuses the packed corrections; activating another
    adapter, or loading new values under a known name, packs them again."""
    ids = _ids(2)

    def served() -> torch.Tensor:
        with torch.no_grad(), bank.per_request(NAMES) as model:
            return model(input_ids=ids).logits

    def alone() -> torch.Tensor:
        active = bank.active
        out = torch.stack([_alone(bank, ids, spec)[i] for i, spec in enumerate(NAMES)])
        if active is not None:
            bank.activate(active)
        return out

    first = served()
    packed = _request_buffers(bank)
    assert packed
    torch.testing.assert_close(served(), first, rtol=0, atol=0)
    assert all(_request_buffers(bank)[k] is t for k, t in packed.items()), "the same batch packed again"
    bank.activate("a2")
    torch.testing.assert_close(served(), alone(), rtol=1e-5, atol=1e-5)
    bank.deactivate()
    bank.unload("a1")
    (tmp_path / "new").mkdir()
    bank.load("a1", trained_adapters(tmp_path / "new", n=4)[3])  # other values under the old name
    torch.testing.assert_close(served(), alone(), rtol=1e-5, atol=1e-5)


def _request_buffers(bank) -> dict[str, torch.Tensor]:
    return {k: t for k, t in bank.model.named_buffers() if "shira_request" in k}


def test_a_wrong_list_is_refused_before_anything_runs(bank):
    with pytest.raises(shira_fx.ShiraAdapterError, match="not loaded"):
        with bank.per_request(["a0", "nope"]):
            pass
    with pytest.raises(shira_fx.ShiraAdapterError, match="non-empty list"):
        with bank.per_request("a0"):
            pass
    with pytest.raises(shira_fx.ShiraAdapterError, match="rows first"):
        with torch.no_grad(), bank.per_request(["a0", "a1"]) as model:
            model(input_ids=_ids())  # 6 rows, 2 names


def test_mixed_batches_beside_fused_requests_in_threads_keep_every_request_on_its_adapter(bank):
    ids = _ids(2)
    expected = {spec: _alone(bank, ids, spec) for spec in ("a0", "a1", None)}
    mixed = ["a1", "a0", None, "a1", "a0", None]
    want_mixed = torch.stack([expected[s][i] for i, s in enumerate(mixed)])
    errors = []

    def fused(spec):
        for _ in range(4):
            with torch.no_grad(), bank.using(spec) as model:
                out = model(input_ids=ids).logits
            if not torch.allclose(out, expected[spec], rtol=1e-5, atol=1e-5):
                errors.append(("fused", spec))

    def per_row():
        for _ in range(4):
            with torch.no_grad(), bank.per_request(mixed) as model:
                out = model(input_ids=ids).logits
            if not torch.allclose(out, want_mixed, rtol=1e-5, atol=1e-5):
                errors.append(("mixed",))

    threads = [threading.Thread(target=fused, args=(s,)) for s in ("a0", "a1")] + \
        [threading.Thread(target=per_row) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors








@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_mixed_batches_and_requests_for_the_active_adapter_run_together(bank, compiled):
    """Mixed batches are readers: two of them (different lists) and a request for the active
    adapter are inside their blocks at once (the barrier needs all three), each computing
    its own rows, compiled too. (Recompiles are not counted here: Dynamo, called at once from
    threads that hit different compiled entries of one function, now and then misses an
    entry and compiles it again, about once in 40 such rounds here, outputs right; the
    sequential test above counts them.)"""
    ids = _ids(3)
    lists = [NAMES, [None, "a2", "a2", {"a0": 1.0, "a1": 0.5}, "a1", None]]
    want = [torch.stack([_alone(bank, ids, spec)[i] for i, spec in enumerate(names)]) for names in lists]
    want_active = _alone(bank, ids, "a1")
    bank.activate("a1")
    forward = bank.model
    if compiled:
        torch._dynamo.reset()
        forward = torch.compile(bank.model, backend=shira_fx.backend(inner="aot_eager"))
        with torch.no_grad():  # compiled (and the table packed) before the threads start
            with bank.per_request(lists[0]):
                forward(input_ids=ids)
            with bank.using("a1"):
                forward(input_ids=ids)
    together = threading.Barrier(3, timeout=60)
    errors, got = [], {}

    def mixed(i):
        with torch.no_grad(), bank.per_request(lists[i]):
            together.wait()
            got[i] = forward(input_ids=ids).logits

    def request():
        with torch.no_grad(), bank.using("a1"):
            together.wait()
            got["a1"] = forward(input_ids=ids).logits

    join([start(lambda: mixed(0), errors), start(lambda: mixed(1), errors), start(request, errors)],
          errors)
    for i, names in enumerate(lists):
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5, msg=f"batch {names}")
    torch.testing.assert_close(got["a1"], want_active, rtol=1e-5, atol=1e-5)
    assert bank.active == {"a1": 1.0} and not hasattr(bank._rows, "rows")


def test_a_fusion_not_served_before_packs_alone_and_the_table_keeps_it(bank, monkeypatch):
    """A mixed batch that needs a new table entry packs as a writer: it waits for the mixed
    batch inside, and a later batch that needs nothing new waits behind it (writers first);
    afterwards the table holds the new entry and the earlier batches pack nothing."""
    ids = _ids(4)
    fused = ["a0", {"a1": 1.0, "a2": 0.25}, None, "a2", "a1", "a0"]
    want = torch.stack([_alone(bank, ids, spec)[i] for i, spec in enumerate(fused)])
    packs, errors = [], []
    pack = mixed_batches._pack

    def logged(bank, specs):
        packs.append(len(specs))
        pack(bank, specs)

    monkeypatch.setattr(mixed_batches, "_pack", logged)
    with torch.no_grad(), bank.per_request(NAMES):
        pass
    assert packs == [B]
    gate = bank._gate
    inside, leave, got = threading.Event(), threading.Event(), {}

    def first():
        with torch.no_grad(), bank.per_request(NAMES):
            inside.set()
            assert leave.wait(60)

    def new_fusion():
        with torch.no_grad(), bank.per_request(fused) as model:
            got["fused"] = model(input_ids=ids).logits

    def late():
        with torch.no_grad(), bank.per_request(NAMES):
            got["late"] = True

    threads = [start(first, errors)]
    assert inside.wait(60)
    threads.append(start(new_fusion, errors))
    until(lambda: gate.waiting == 1, "the new fusion to wait for the batch inside")
    threads.append(start(late, errors))
    until(lambda: gate.blocked == 2, "the late batch to wait behind the packing")
    assert packs == [B] and gate.readers == 1
    leave.set()
    join(threads, errors)
    assert packs == [B, B] and got["late"]
    torch.testing.assert_close(got["fused"], want, rtol=1e-5, atol=1e-5)
    for names in (NAMES, fused):
        with torch.no_grad(), bank.per_request(names):
            pass
    assert packs == [B, B], "the table shrank: a batch served before packed again"


def test_the_table_keeps_the_last_max_mixed_fusions(tmp_path, monkeypatch):
    """Beyond `max_mixed` fusions the oldest not in the batch is dropped (that batch packs
    again when it comes back); a batch with more fusions than that still gets them all."""
    model = tiny_models.build("llama").eval()
    bank = shira_fx.AdapterBank(model, max_mixed=2)
    for i, path in enumerate(trained_adapters(tmp_path)):
        bank.load(f"a{i}", path)
    fusions = [{"a0": 1.0, "a1": w} for w in (0.25, 0.5, 0.75)]
    packs = []
    pack = mixed_batches._pack
    monkeypatch.setattr(mixed_batches, "_pack", lambda bank, specs: (packs.append(1), pack(bank, specs)))
    ids = _ids(5)
    for f in [*fusions, fusions[2], fusions[1], fusions[0]]:
        with torch.no_grad(), bank.per_request([f] * B):
            pass
    # packed for 0.25, 0.5, 0.75 (0.25 dropped), reused for 0.75 and 0.5, packed for 0.25 again
    assert len(packs) == 4 and len(bank._table.specs) == 1 + 3 + 2
    names = [*fusions, "a2", None, fusions[0]]
    want = torch.stack([_alone(bank, ids, spec)[i] for i, spec in enumerate(names)])
    with torch.no_grad(), bank.per_request(names) as served:
        torch.testing.assert_close(served(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(shira_fx.ShiraConfigError, match="max_mixed must be a positive int"):
            shira_fx.AdapterBank(model, max_mixed=bad)


def test_nesting_rules_and_an_error_inside_releases_everything(bank):
    with bank.using("a0"):
        with pytest.raises(shira_fx.ShiraAdapterError, match="per_request inside"):
            with bank.per_request(["a1"]):
                pass
    with bank.per_request(["a1"] * B):
        for inner in (lambda: bank.using("a0"), lambda: bank.per_request(["a0"])):
            with pytest.raises(shira_fx.ShiraAdapterError, match="per_request"):
                with inner():
                    pass
        with pytest.raises(shira_fx.ShiraAdapterError, match="deadlock"):
            bank.activate("a0")
    with pytest.raises(RuntimeError, match="boom"):
        with bank.per_request(["a1"] * B):
            raise RuntimeError("boom")
    gate = bank._gate
    assert gate.readers == gate.waiting == gate.blocked == 0 and not gate.writing
    assert not hasattr(bank._rows, "rows") and gate.held() is None
    bank.activate("a2")  # would hang on a leaked reader
    assert bank.active == {"a2": 1.0}
