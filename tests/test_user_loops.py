"""Where users already train: any optimizer over `model.parameters()` (HF Trainer), autocast,
GradScaler, meta-device init, compile by name and mode, and the inputs that must be refused
before anything changes."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import shira_fx
from shira_fx import ShiraAdapterError, ShiraConfig, ShiraConfigError, ShiraTrainingError
from tests import tiny_models


def _fused_is_base_plus_values(model: nn.Module, base: dict, adapter) -> None:
    """Every adapted weight holds exactly round(base + values) at its mask and the base
    elsewhere; every other parameter and buffer of the model is unchanged."""
    adapted = {f"{name}.weight" for name in adapter.layers}
    state = model.state_dict()
    for key, value in state.items():
        if key not in adapted:
            assert torch.equal(value, base[key]), f"{key} changed"
    for name, layer in adapter.layers.items():
        w, b = state[f"{name}.weight"].view(-1), base[f"{name}.weight"].view(-1)
        idx = layer.indices.long()
        want = (b[idx].float() + layer.values.detach().float()).to(w.dtype)
        assert torch.equal(w[idx], want), name
        rest = torch.ones_like(w, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(w[rest], b[rest]), f"{name}: an element outside the mask changed"


# -- a plain loop over model.parameters() ---------------------------------------------------
def test_an_optimizer_over_model_parameters_trains_the_values_and_syncs():
    model = tiny_models.build("llama")
    base = copy.deepcopy(model.state_dict())
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for i in range(8):
        loss = model(**tiny_models.batch("llama", seed=i % 2)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(la.values.abs().sum() > 0 for la in adapter.layers.values())
    _fused_is_base_plus_values(model, base, adapter)


def test_state_dict_keeps_the_base_keys_and_loading_it_back_keeps_the_values():
    model = tiny_models.build("mlp")
    keys = set(model.state_dict())
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.2), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.uniform_(-0.1, 0.1)
    adapter.sync()
    values = [la.values.detach().clone() for la in adapter.layers.values()]
    state = model.state_dict()
    assert set(state) == keys
    model.load_state_dict(state)  # strict: the values are not expected in it
    for before, layer in zip(values, adapter.layers.values(), strict=True):
        torch.testing.assert_close(layer.values.detach(), before, rtol=0, atol=1e-6)


# -- HF Trainer ------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _trainer_run(tmp_path, bf16: bool, compile_first: bool):
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("HF Trainer needs accelerate")
    model = tiny_models.build("llama")
    base = copy.deepcopy(model.state_dict())
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.1), progress=False)
    if compile_first:
        model.compile(backend=shira_fx.backend(inner="aot_eager"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_models.VOCAB, (4, 12), generator=g)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=24, learning_rate=2e-2,
        logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16,
        disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(rows))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, base, adapter, losses


@pytest.mark.parametrize("bf16,compile_first", [
    (False, False), pytest.param(True, True, marks=pytest.mark.slow)], ids=["fp32", "bf16-compiled"])
def test_hf_trainer_trains_the_adapter_with_no_glue(tmp_path, bf16, compile_first):
    model, base, adapter, losses = _trainer_run(tmp_path, bf16, compile_first)
    assert losses[-1] < losses[0], losses
    _fused_is_base_plus_values(model, base, adapter)
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    ids = tiny_models.batch("llama")["input_ids"]
    # the trained weights in a plain model: Accelerate leaves its bf16 autocast on model.forward
    plain = tiny_models.build("llama")
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        trained = plain(input_ids=ids).logits
    served = tiny_models.build("llama")
    bank = shira_fx.AdapterBank(served)
    bank.load("trained", path)
    bank.activate("trained")
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, trained, rtol=0, atol=0)


# -- compile by name and mode ----------------------------------------------------------------
def test_the_backend_is_registered_by_name():
    from shira_fx.compile.backend import default_backend

    assert torch._dynamo.lookup_backend("shira_fx") is default_backend


def test_a_cuda_graph_mode_is_refused_for_training_graphs_with_the_mode_to_use():
    torch._dynamo.reset()
    model = tiny_models.build("mlp")
    shira_fx.prepare(model, ShiraConfig(density=0.1), progress=False)
    compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager"), mode="reduce-overhead")
    with pytest.raises(Exception, match="max-autotune-no-cudagraphs") as exc:
        compiled(torch.randn(3, 24))
    assert isinstance(getattr(exc.value, "inner_exception", exc.value), ShiraConfigError)


def _compiled_grads(model, adapter, backend, mode=None):
    torch._dynamo.reset()
    x = tiny_models.batch("llama")
    kwargs = {} if mode is None else {"mode": mode}
    tiny_models.loss(torch.compile(model, backend=backend, **kwargs), x).backward()
    grads = [la.values.grad.clone() for la in adapter.layers.values()]
    for la in adapter.layers.values():
        la.values.grad = None
    return grads


@pytest.mark.slow
def test_compile_by_name_and_mode_trains_like_the_backend_object():
    model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.1), progress=False)
    want = _compiled_grads(model, adapter, shira_fx.backend())
    for mode in (None, "max-autotune-no-cudagraphs"):
        got = _compiled_grads(model, adapter, "shira_fx", mode)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# -- mixed precision -------------------------------------------------------------------------
def _masked_dense_grads(kind: str, batch: dict, adapter) -> list[torch.Tensor]:
    ref = tiny_models.build(kind)
    tiny_models.loss(ref, batch).backward()
    mods = dict(ref.named_modules())
    return [mods[n].weight.grad.view(-1)[la.indices.long()] for n, la in adapter.layers.items()]


@pytest.mark.parametrize("mode", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_bf16_autocast_gradients_match_the_fp32_masked_gradient(mode):
    torch._dynamo.reset()
    model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.1), progress=False)
    batch = tiny_models.batch("llama")
    want = _masked_dense_grads("llama", batch, adapter)
    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_models.loss(run, batch)
    loss.backward()
    for (name, layer), ref in zip(adapter.layers.items(), want, strict=True):
        g = layer.values.grad
        assert g is not None and g.dtype == torch.float32, name
        assert float((g - ref).norm() / ref.norm()) < 0.05, name


def test_grad_scaler_applies_the_unscaled_update():
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        model = tiny_models.build("mlp")
        adapter = shira_fx.prepare(model, ShiraConfig(density=0.2), progress=False)
        opt = torch.optim.SGD(adapter.parameters(), lr=0.1)

        @shira_fx.train_step(adapter, opt, scaler=scaler)
        def step(x, model=model):
            return model(x).pow(2).mean()

        step(tiny_models.batch("mlp")["x"])
        results.append([la.values.detach().clone() for la in adapter.layers.values()])
    for plain, scaled in zip(*results, strict=True):
        torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-8)
        assert plain.abs().sum() > 0


# -- big models on meta ----------------------------------------------------------------------
def test_a_model_prepared_on_meta_takes_its_base_when_the_weights_load():
    real = tiny_models.build("mlp")
    with torch.device("meta"):
        model = tiny_models.mlp()
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.2, mask="rand"), progress=False)
    model.to_empty(device="cpu")
    x = tiny_models.batch("mlp")["x"]
    with pytest.raises(ShiraConfigError, match="load_state_dict"):
        model(x)
    model.load_state_dict(real.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), real(x), rtol=0, atol=0)
    expected = shira_fx.prepare(real, ShiraConfig(density=0.2, mask="rand"), progress=False)
    for name, layer in adapter.layers.items():
        assert torch.equal(layer.indices, expected.layers[name].indices)
        assert torch.equal(layer.base, expected.layers[name].base)
        assert not layer.values.any()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)

    @shira_fx.train_step(adapter, opt)
    def step(batch):
        return model(batch).pow(2).mean()

    losses = [step(x) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_masks_that_read_weights_are_refused_on_meta_with_the_steps_to_take():
    with torch.device("meta"):
        model = tiny_models.mlp()
    with pytest.raises(ShiraConfigError, match="meta device.*load_state_dict"):
        shira_fx.prepare(model, ShiraConfig(density=0.2, mask="wm"), progress=False)
    assert not any(hasattr(m, "shira_values") for m in model.modules())


# -- refused before anything changes ---------------------------------------------------------
def _untouched(model: nn.Module, before: dict) -> None:
    assert set(model.state_dict()) == set(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    assert not any("_shira_layer" in m.__dict__ for m in model.modules())


def test_a_tied_weight_is_refused_by_name():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ShiraConfigError, match="lm_head.*shared.*embed_tokens"):
        shira_fx.prepare(model, ShiraConfig(target_modules=["lm_head", "q_proj"]), progress=False)
    _untouched(model, before)
    shira_fx.prepare(model, ShiraConfig(), progress=False)  # default targets leave the head out


def test_a_second_prepare_and_removing_the_first_keep_the_second_adapter_frozen_right():
    model = tiny_models.build("mlp")
    first = shira_fx.prepare(model, ShiraConfig(target_modules=["0"], density=0.2), progress=False)
    second = shira_fx.prepare(model, ShiraConfig(target_modules=["2"], density=0.2), progress=False)
    trainable = lambda: {id(p) for p in model.parameters() if p.requires_grad}  # noqa: E731
    assert trainable() == {id(p) for a in (first, second) for p in a.parameters()}
    first.remove()
    assert trainable() == {id(p) for p in second.parameters()}
    second.remove()
    assert all(p.requires_grad for p in model.parameters())
    shira_fx.prepare(model, ShiraConfig(target_modules=["0"], density=0.2), progress=False)
    with pytest.raises(ShiraConfigError, match="already carries"):
        shira_fx.prepare(model, ShiraConfig(target_modules=["0"], density=0.2), progress=False)


def test_a_zero_size_layer_is_refused_at_prepare():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 0))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ShiraConfigError, match="'1'.*no element"):
        shira_fx.prepare(model, ShiraConfig(density=0.5), progress=False)
    _untouched(model, before)


def test_save_names_the_users_path(tmp_path):
    adapter = shira_fx.prepare(tiny_models.build("mlp"), ShiraConfig(density=0.1), progress=False)
    missing = tmp_path / "no_such_folder" / "a.safetensors"
    with pytest.raises(ShiraAdapterError, match="no_such_folder.*does not exist"):
        adapter.save(missing)
    with pytest.raises(ShiraAdapterError, match="is a directory"):
        adapter.save(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_peft_wrapped_model_is_refused_not_its_lora_matrices_adapted():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_models.build("llama"),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for cfg in (ShiraConfig(), ShiraConfig(target_modules=["q_proj"])):
        with pytest.raises(ShiraConfigError, match="PEFT"):
            shira_fx.prepare(model, cfg, progress=False)
    assert not any("_shira_layer" in m.__dict__ for m in model.modules())


def test_a_non_finite_gradient_of_another_parameter_applies_nothing():
    model = tiny_models.build("mlp")
    head = nn.Linear(8, 1)
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.2), progress=False)
    opt = torch.optim.SGD(list(adapter.parameters()) + list(head.parameters()), lr=0.1)

    @shira_fx.train_step(adapter, opt)
    def step(x):
        return head(model(x)).mean()

    x = tiny_models.batch("mlp")["x"]
    head.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    head_before = head.weight.detach().clone()
    with pytest.raises(ShiraTrainingError, match="non-finite gradient"):
        step(x)
    assert all(not la.values.any() for la in adapter.layers.values())
    assert torch.equal(head.weight, head_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


class _LeavesALayerOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):  # b is prepared, but this forward never reads it
        return self.a(x)


def test_a_layer_backward_never_reaches_is_named_before_the_first_step():
    model = _LeavesALayerOut()
    adapter = shira_fx.prepare(model, ShiraConfig(density=0.5), progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    with pytest.raises(ShiraTrainingError, match="no value of 1 prepared layer.*: b;"):
        opt.step()
    assert not adapter.layers["a"].values.any()
