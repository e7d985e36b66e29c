"""Memory: the backward never makes a weight-sized tensor, and a training step's peak of
live tensor bytes is below PEFT LoRA's at equal trainable parameters."""

import pytest
import torch
from torch import nn

import shira_fx
from shira_fx.memory import LiveTensorTracker, step_peak_bytes


def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.Linear(256, 64))


@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
def test_backward_never_allocates_a_weight_sized_tensor(mode):
    model = wide_mlp()
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.05), progress=False)
    run = model if mode == "eager" else torch.compile(model, backend=shira_fx.backend(inner=mode))
    x = torch.randn(12, 256, requires_grad=True)  # activations (12×256) smaller than a weight
    run(x).pow(2).mean().backward()  # warm-up (compiles)
    adapter.zero_grad()
    loss = run(x).pow(2).mean()
    with LiveTensorTracker() as tracker:
        loss.backward()
    smallest_weight = min(layer.weight.numel() for layer in adapter.layers.values())
    assert tracker.allocations, "the tracker saw no allocation: it is not measuring anything"
    biggest = tracker.largest()
    assert biggest.numel < smallest_weight, biggest
    assert all(layer.values.grad is not None for layer in adapter.layers.values())


def test_the_tracker_does_see_a_dense_weight_gradient():
    model = wide_mlp()
    loss = model(torch.randn(12, 256)).pow(2).mean()
    with LiveTensorTracker() as tracker:
        loss.backward()
    assert tracker.largest().numel >= 256 * 256


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_training_step_peak_is_below_peft_lora_at_equal_trainable_parameters():
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    lora = peft.get_peft_model(
        _llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    )
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    lora_peak = step_peak_bytes(lora, lora_params, batch)

    model = _llama()
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=targets, r=4),
                               progress=False)
    assert adapter.num_trainable() == sum(p.numel() for p in lora_params)
    shira_peak = step_peak_bytes(model, list(adapter.parameters()), batch, adapter.check_optimizer)
    assert shira_peak < lora_peak, (shira_peak, lora_peak)
