"""`shira-fx bench`: train a SHiRA adapter on a Llama built from a config, through the
shira_fx backend, beside PEFT LoRA at the same trainable-parameter count, and print a table
(loss, activations held for backward, peak live tensor memory, step time). Offline: the
model and the task are generated, so any size can be tried (`--hidden`, `--layers`)."""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

import shira_fx
from shira_fx.memory import saved_tensor_bytes, step_peak_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg)


def copy_task(batch: int, seq: int, vocab: int, seed: int) -> dict:
    """Sequences whose second half repeats the first: learnable only by attending back."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(1, vocab, (batch, seq // 2), generator=g)
    ids = torch.cat([half, half], dim=1)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "labels": labels}


def _train(name, model, compiled, params, steps, batches, lr, after_step=None):
    """Train; returns losses, median step seconds and the bytes the compiled step holds for
    backward (activations, parameters excluded) measured on the last step."""
    opt = torch.optim.AdamW(params, lr=lr)
    if after_step is not None:
        after_step(opt)
    state = list(model.parameters()) + list(model.buffers())
    losses, times, held = [], [], 0
    for i in tqdm(range(steps), desc=f"train {name}", unit="step"):
        t0 = time.perf_counter()
        batch = batches[i % len(batches)]
        held, loss = saved_tensor_bytes(lambda: compiled(**batch).loss, exclude=state)  # noqa: B023
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, statistics.median(times[2:] or times), held


def run(steps: int = 40, hidden: int = 256, layers: int = 4, vocab: int = 512, batch: int = 8,
        seq: int = 64, r: int = 8, inner: str = "inductor") -> dict:
    import peft

    batches = [copy_task(batch, seq, vocab, seed=i) for i in range(8)]
    rows = {}

    model = build_model(hidden, layers, vocab)
    cfg = shira_fx.ShiraConfig(target_modules=TARGETS, r=r)
    adapter = shira_fx.prepare(model, cfg, progress=False)
    params = list(adapter.parameters())
    peak = step_peak_bytes(model, params, batches[0], adapter.attach)
    backend = shira_fx.backend(cfg, inner=inner)
    losses, step_s, held = _train("shira_fx", model, torch.compile(model, backend=backend),
                                  params, steps, batches, 5e-3, adapter.attach)
    rows["shira_fx"] = (adapter.num_trainable(), losses[0], losses[-1], held, peak, step_s)

    lora = peft.get_peft_model(build_model(hidden, layers, vocab),
                               peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    params = [p for p in lora.parameters() if p.requires_grad]
    peak = step_peak_bytes(lora, params, batches[0])
    compiled = torch.compile(lora, backend=inner)
    losses, step_s, held = _train("PEFT LoRA", lora, compiled, params, steps, batches, 2e-3)
    rows["PEFT LoRA"] = (sum(p.numel() for p in params), losses[0], losses[-1], held, peak, step_s)

    print(f"\nLlama from a config: hidden {hidden}, {layers} layers, batch {batch}x{seq}, "
          f"all 7 linears, {steps} AdamW steps, torch.compile({inner}), "
          f"{torch.get_num_threads()} CPU threads\n")
    print("| adapter | trainable | loss first -> last | held for backward MiB (compiled) | "
          "peak live MiB (eager step) | step ms |")
    print("|---|---:|---|---:|---:|---:|")
    for name, (n, l0, l1, held, pk, s) in rows.items():
        print(f"| {name} | {n:,} | {l0:.3f} -> {l1:.3f} | {held / 2**20:.1f} | {pk / 2**20:.1f} | "
              f"{s * 1e3:.0f} |")
    ours, lora_row = rows["shira_fx"], rows["PEFT LoRA"]
    print(f"\nshira_fx holds {ours[3] / lora_row[3]:.2f}x the activations PEFT LoRA holds for "
          f"backward; eager-step peak {ours[4] / lora_row[4]:.2f}x")
    print(shira_fx.explain(backend).splitlines()[0])
    return rows
