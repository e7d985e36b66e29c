"""The backend's recompute pass: a rewritten linear's input is rebuilt in backward, so
shira_fx holds the frozen model's activations only; gradients are unchanged."""

import pytest
import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

import shira_fx
from shira_fx.adapter import settle_layouts
from shira_fx.memory import resident_state, saved_tensor_bytes
from tests import tiny_models

# the same partitioner shira_fx's aot_eager path uses, for the frozen and LoRA baselines
MIN_CUT = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g),
                       bw_compiler=lambda g, _: make_boxed_func(g),
                       partition_fn=min_cut_rematerialization_partition)
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "key", "value", "dense"]}


def held(model, batch, backend, adapter=None) -> int:
    """Bytes saved for backward in one step, parameters, buffers and the adapter's own
    values and indices excluded (they stay resident whatever backward does). The second step
    is measured: the first compiles and, under Inductor, verifies its gradients with runs of
    its own (transient, but they pass through the same saved-tensor hooks)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(**batch).loss.backward()
    state = resident_state(model)
    if adapter is not None:
        state += [t for la in adapter.layers.values() for t in (la.values, la.indices)]
    nbytes, loss = saved_tensor_bytes(lambda: compiled(**batch).loss, exclude=state)
    loss.backward()
    return nbytes


def _build(kind, checkpointing):
    model = tiny_models.build(kind)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


@pytest.mark.parametrize("kind,checkpointing,inner", [
    # Inductor runs its own joint passes before shira_fx's tags and the min-cut partitioner
    pytest.param("llama", False, "inductor", marks=pytest.mark.slow, id="llama-inductor"),
    pytest.param("gpt2", False, "aot_eager", marks=pytest.mark.slow, id="gpt2"),
    pytest.param("bert", False, "aot_eager", marks=pytest.mark.slow, id="bert"),
    # the checkpointed path is one code path for every family (test_training checks GPT-2's)
    pytest.param("llama", True, "aot_eager", marks=pytest.mark.slow, id="llama-checkpointed")])
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers: gradient_checkpointing_enable
def test_bytes_held_for_backward_stay_at_the_frozen_floor(kind, checkpointing, inner):
    peft = pytest.importorskip("peft")
    batch = tiny_models.batch(kind, size=4, seq=24)

    frozen = _build(kind, checkpointing).requires_grad_(False)
    ids = batch.pop("input_ids")
    embeds = frozen.get_input_embeddings()(ids).detach().requires_grad_(True)
    baseline = MIN_CUT if inner == "aot_eager" else inner
    floor = held(frozen, {**batch, "inputs_embeds": embeds}, baseline)
    batch["input_ids"] = ids

    lora_cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS[kind])
    lora = held(peft.get_peft_model(_build(kind, checkpointing), lora_cfg), batch, baseline)

    model = _build(kind, checkpointing)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=TARGETS[kind], r=2),
                               progress=False)
    backend = shira_fx.backend(inner=inner)
    ours = held(model, batch, backend, adapter)
    assert set(backend.layers().values()) == {"rewritten"}, shira_fx.explain(backend)
    assert ours <= floor + 0.1 * (lora - floor), (floor, lora, ours)
    if checkpointing:  # the blocks' layers are rewritten inside their checkpointed regions
        assert lora >= floor
        in_blocks = {n for n in adapter.layers if any(part.isdigit() for part in n.split("."))}
        assert in_blocks and in_blocks <= {n for r in backend.reports for n in r.checkpointed}
        return
    assert backend.reports[0].recomputed > 0
    assert lora > floor, "the LoRA baseline holds nothing extra: the measure is broken"
    if inner != "aot_eager":
        return

    model = tiny_models.build(kind)
    shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=TARGETS[kind], r=2), progress=False)
    saved = held(model, batch, shira_fx.backend(inner="aot_eager", recompute="off"))
    assert saved > ours  # without the pass, x is kept as LoRA keeps it


def _train(kind, recompute, steps=20, **model_kw):
    torch.manual_seed(0)
    model = tiny_models.build(kind)
    for key, value in model_kw.items():
        setattr(model.config, key, value)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager", recompute=recompute))

    @shira_fx.train_step(adapter, opt)
    def step(b):
        return compiled(**b).loss

    torch.manual_seed(1)
    for i in range(steps):
        step(tiny_models.batch(kind, seed=i))
    return torch.cat([p.detach() for p in adapter.parameters()])


@pytest.mark.parametrize("kind", ["llama", pytest.param("bert", marks=pytest.mark.slow)])
def test_twenty_steps_with_the_pass_equal_the_pass_off_bit_for_bit(kind):
    assert torch.equal(_train(kind, "auto"), _train(kind, "off"))


@pytest.mark.slow
def test_dropout_is_never_replayed():
    model = tiny_models.build("gpt2")
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.2
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    grads = []
    for recompute in ("auto", "off"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=shira_fx.backend(inner="aot_eager", recompute=recompute))
        torch.manual_seed(3)
        compiled(**tiny_models.batch("gpt2")).loss.backward()
        values = {id(la.values) for la in adapter.layers.values()}
        assert all(p.grad is None for p in model.parameters() if id(p) not in values)  # frozen
        grads.append(torch.cat([la.values.grad.clone() for la in adapter.layers.values()]))
        for la in adapter.layers.values():
            la.values.grad = None
    assert torch.equal(grads[0], grads[1])


def test_bad_recompute_arguments_are_refused():
    with pytest.raises(ValueError, match="recompute"):
        shira_fx.backend(recompute="always")
    with pytest.raises(ValueError, match="memory_budget"):
        shira_fx.backend(memory_budget=1.5)


@pytest.mark.parametrize("inner", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_explain_reports_each_layers_input_and_the_bytes_held(inner):
    """The report is read off the partitioned graph: its byte count agrees with what autograd
    really holds, and it says which inputs are rebuilt and which are kept, and why."""
    model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    batch = tiny_models.batch("llama", size=4, seq=24)
    backend = shira_fx.backend(inner=inner)
    measured = held(model, batch, backend, adapter)
    (report,) = backend.reports
    assert report.held_bytes is not None and 0.9 * measured <= report.held_bytes <= measured
    assert set(report.inputs) == set(adapter.layers)
    for name, fate in report.inputs.items():
        if name.endswith("o_proj"):  # x is the attention output: not pointwise, so kept
            assert "saved" in fate and "scaled_dot_product" in fate, fate
        else:  # RMSNorm outputs and the SwiGLU product are rebuilt from what backward keeps
            assert "rebuilt in backward" in fate, fate
    text = shira_fx.explain(backend)
    assert "held for backward" in text and "model.layers.1.mlp.down_proj: x (" in text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes on the CPU
def test_a_quantized_base_holds_the_frozen_floor_too(tmp_path_factory):
    """On a 4-bit base a layer computes one GEMM on its dequantized weight with the delta
    written in (`dequantized_linear`): its input x is rebuilt in backward as a `sparse_linear`
    input is, and the dequantized weight rebuilt there too, so shira_fx holds what the frozen
    4-bit model holds, where QLoRA keeps each x."""
    peft = pytest.importorskip("peft")
    from tests.test_quantized import bnb_4bit

    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    frozen = bnb_4bit(tmp_path_factory).requires_grad_(False)
    settle_layouts(frozen)  # the baselines compute with one layout too (shira_fx settles its own)
    embeds = frozen.get_input_embeddings()(ids).detach().requires_grad_(True)
    floor = held(frozen, {"inputs_embeds": embeds, "labels": ids}, MIN_CUT)
    batch = {"input_ids": ids, "labels": ids}
    lora_cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS["llama"])
    qlora = bnb_4bit(tmp_path_factory)
    settle_layouts(qlora)
    lora = held(peft.get_peft_model(qlora, lora_cfg), batch, MIN_CUT)
    model = bnb_4bit(tmp_path_factory)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=TARGETS["llama"], r=2),
                               progress=False)
    backend = shira_fx.backend(inner="aot_eager")
    ours = held(model, batch, backend, adapter)
    report = backend.reports[0]
    assert report.dequantized and report.recomputed > 0, shira_fx.explain(backend)
    assert lora > floor, "the QLoRA baseline holds nothing extra: the measure is broken"
    assert ours <= floor + 0.1 * (lora - floor), (floor, lora, ours)
