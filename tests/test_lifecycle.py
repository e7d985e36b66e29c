"""An adapted module survives everything nn.Module allows, on two families (Llama, and GPT-2
whose Conv1D stores its weight transposed): a deep copy trains like the original and leaves it
untouched; torch.save / torch.load and pickle round-trip a whole prepared model; casting keeps
the fp32 master values and writes base + values with one rounding; the state dict round-trips
the values bit for bit, and an HF Trainer checkpoint resumes bit for bit."""

from __future__ import annotations

import copy
import importlib.util
import pickle
import warnings

import pytest
import torch

import shira_fx
from shira_fx import ShiraConfig, SparseAdapter
from tests import tiny_models

FAMILIES = ["llama", "gpt2"]
CFG = ShiraConfig(density=0.1)


def _prepared(kind: str):
    model = tiny_models.build(kind)
    return model, shira_fx.prepare(model, CFG, progress=False)


def _steps(model, opt, seeds, autocast: torch.dtype | None = None) -> list[float]:
    losses = []
    for seed in seeds:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = tiny_models.loss(model, tiny_models.batch(model_kind(model), seed=seed))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def model_kind(model) -> str:
    return "gpt2" if "GPT2" in type(model).__name__ else "llama"


def _state(adapter: SparseAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's values and the fused weight at its indices, copied."""
    return {name: (la.values.detach().clone(), la.weight.detach().reshape(-1)[la.indices.long()].clone())
            for name, la in adapter.layers.items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert torch.equal(x, y), name


def _assert_fused(adapter: SparseAdapter) -> None:
    for name, la in adapter.layers.items():
        fused = la.weight.detach().reshape(-1)[la.indices.long()]
        want = (la.base.float() + la.values.detach().float()).to(la.weight.dtype)
        assert torch.equal(fused, want), name


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_deep_copy_trains_like_the_original_and_leaves_it_untouched(kind):
    model, adapter = _prepared(kind)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    _steps(model, opt, [0, 1])
    twin, twin_opt = copy.deepcopy((model, opt))  # a model and its optimizer, copied together
    before = _state(adapter)
    twin_losses = _steps(twin, twin_opt, [2, 3, 4])
    _assert_same(_state(adapter), before)  # the original did not move
    twin_adapter = SparseAdapter.of(twin)
    assert twin_adapter is not adapter and SparseAdapter.of(model) is adapter
    assert {id(la.module) for la in twin_adapter.layers.values()} <= {id(m) for m in twin.modules()}
    _assert_fused(twin_adapter)
    assert _steps(model, opt, [2, 3, 4]) == twin_losses  # the original's own three steps
    _assert_same(_state(twin_adapter), _state(adapter))
    twin_adapter.remove()  # the copy goes back to its base; the original keeps its adapter
    fresh = tiny_models.build(kind)
    for (name, p), (_, q) in zip(twin.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q) and p.requires_grad, name
    _assert_fused(adapter)


@pytest.mark.parametrize("kind", FAMILIES)
def test_torch_save_and_pickle_round_trip_a_prepared_model(kind, tmp_path):
    model, adapter = _prepared(kind)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    _steps(model, opt, [0, 1])
    ids = tiny_models.batch(kind, seed=9)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.save(model, tmp_path / "model.pt")
    for loaded in (torch.load(tmp_path / "model.pt", weights_only=False), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, want)
        again = SparseAdapter.of(loaded)
        _assert_same(_state(again), _state(adapter))
        loaded_opt = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
        _steps(loaded, loaded_opt, [2])  # it trains: its own hook syncs its own weights
        _assert_fused(again)
        pairs = zip(_state(again).values(), _state(adapter).values(), strict=True)
        assert any(not torch.equal(a[0], b[0]) for a, b in pairs)


@pytest.mark.parametrize("kind", FAMILIES)
def test_casting_keeps_fp32_master_values_and_writes_base_plus_values_once(kind):
    model, adapter = _prepared(kind)
    _steps(model, torch.optim.AdamW(adapter.parameters(), lr=1e-2), [0, 1])
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = {n: la.values.detach().clone() for n, la in adapter.layers.items()}
    bases = {n: la.base.clone() for n, la in adapter.layers.items()}
    for i, cast in enumerate((lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16())):
        cast(model)
        for name, la in adapter.layers.items():
            assert la.weight.dtype in (torch.bfloat16, torch.float16)
            assert la.values.dtype == torch.float32 and torch.equal(la.values.detach(), values[name])
            assert la.base.dtype == torch.float32 and torch.equal(la.base, bases[name])
        _assert_fused(adapter)  # one rounding of base + values into the new dtype
        for name, p in model.named_parameters():  # every other weight: the fp32 one, cast
            if i == 0 and name in fp32 and not any(name == f"{n}.weight" for n in adapter.layers):
                assert torch.equal(p, fp32[name].to(p.dtype)), name
    model.bfloat16()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    _steps(model, opt, [2, 3])
    moved = sum(int((la.values.detach() != values[n]).sum()) for n, la in adapter.layers.items())
    total = sum(la.values.numel() for la in adapter.layers.values())
    assert moved >= 0.98 * total, f"{moved} of {total} values moved at lr 1e-4"
    _assert_fused(adapter)
    model.float()
    _assert_fused(adapter)
    adapter.remove()  # the base at the weights' original precision: the fp32 model again
    for name, p in model.named_parameters():
        if any(name == f"{n}.weight" for n in adapter.layers):
            la = adapter.layers[name.removesuffix(".weight")]
            assert torch.equal(p.detach().reshape(-1)[la.indices.long()], bases[la.name])


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_state_dict_round_trips_the_values_bit_for_bit(kind):
    model, adapter = _prepared(kind)
    keys = set(tiny_models.build(kind).state_dict())
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    _steps(model, opt, [0, 1, 2])
    state = model.state_dict()
    assert set(state) == keys  # an fp32 model's state dict is the plain merged model
    resumed, resumed_adapter = _prepared(kind)
    resumed.load_state_dict(state)  # strict
    _assert_same(_state(resumed_adapter), _state(adapter))
    resumed_opt = torch.optim.AdamW(resumed_adapter.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own moments
    assert _steps(resumed, resumed_opt, [3]) == _steps(model, opt, [3])
    _assert_same(_state(resumed_adapter), _state(adapter))

    model.bfloat16()  # fp32 masters of bf16 weights: the state dict carries them
    _steps(model, opt, [4], autocast=torch.bfloat16)
    state = model.state_dict()
    assert {k for k in state if k.endswith("shira_values")} == {f"{n}.shira_values" for n in adapter.layers}
    resumed.bfloat16()
    resumed.load_state_dict(state)
    _assert_same(_state(resumed_adapter), _state(adapter))
    merged = {k: v for k, v in state.items() if not k.endswith("shira_values")}  # a plain bf16 file
    with pytest.warns(shira_fx.ShiraWarning, match="rebuilt from the fused weight, within its rounding"):
        resumed.load_state_dict(merged)


def test_a_quantized_base_keeps_its_values_in_the_state_dict(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tests.test_quantized import bnb_4bit

    class _Factory:
        def mktemp(self, name):
            folder = tmp_path / name
            folder.mkdir()
            return folder

    model = bnb_4bit(_Factory())
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.05), progress=False)
    with torch.no_grad():
        for la in adapter.layers.values():
            la.values.normal_(0, 0.01)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(f"{n}.shira_values" in state for n in adapter.layers)
    want = {n: la.values.detach().clone() for n, la in adapter.layers.items()}
    with torch.no_grad():
        for la in adapter.layers.values():
            la.values.zero_()
    # bitsandbytes' 4-bit layers do not load their own packed state back (transformers' loader
    # does that): the values load, bit for bit
    model.load_state_dict({k: v for k, v in state.items() if k.endswith("shira_values")}, strict=False)
    for name, la in adapter.layers.items():
        assert torch.equal(la.values.detach(), want[name]), name


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="HF Trainer needs accelerate")
def test_an_hf_trainer_checkpoint_resumes_bit_for_bit(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.test_user_loops import _Rows

    ids = torch.randint(0, tiny_models.VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids]

    def run(out: str, resume: str | None = None) -> SparseAdapter:
        model, adapter = _prepared("llama")
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=2, max_steps=6, learning_rate=2e-2, save_steps=3,
            save_strategy="steps", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
            lr_scheduler_type="linear", warmup_steps=0, dataloader_num_workers=0, logging_steps=100)
        transformers.Trainer(model=model, args=args, train_dataset=_Rows(rows)).train(
            resume_from_checkpoint=resume)
        return adapter

    straight = run(str(tmp_path / "a"))
    checkpoint = tmp_path / "a" / "checkpoint-3"
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        assert not any(k.endswith("shira_values") for k in f.keys())  # a plain merged model
    resumed = run(str(tmp_path / "b"), resume=str(checkpoint))
    _assert_same(_state(resumed), _state(straight))


def test_loading_a_models_own_state_dict_back_changes_nothing():
    """Its own tensors handed back (as torch's distributed checkpoint fills what a state dict
    lacks): the values stay bit for bit, even where the weight cannot hold them (bf16)."""
    model, adapter = _prepared("llama")
    _steps(model, torch.optim.AdamW(adapter.parameters(), lr=1e-2), [0])
    model.bfloat16()
    before = _state(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", shira_fx.ShiraWarning)
        model.load_state_dict(model.state_dict())
    _assert_same(_state(adapter), before)
