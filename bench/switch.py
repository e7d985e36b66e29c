"""Adapter switching side by side in one run: shira_fx AdapterBank vs PEFT SHiRA and PEFT
LoRA (unmerge + set_adapter + merge) vs the memory-bandwidth floor, and inference latency
of the fused model vs the base model. Prints a markdown table and writes JSON
(bench/results/switch.json; none with --smoke).

    python -m bench.switch           # Llama hidden 512, 4 layers, all linears, 2.5 % density
    python -m bench.switch --smoke   # tiny shapes, for the test suite
"""

from __future__ import annotations

import statistics

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import shira_fx
from bench.common import (
    BenchParser,
    bench_result,
    copy_bandwidth,
    describe,
    fmt,
    machine,
    median_ms,
    print_table,
    ratio,
    save,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LINE = 64  # bytes per cache line


def build(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64))).eval()


def lines_touched(adapter: shira_fx.SparseAdapter) -> int:
    total = 0
    for layer in adapter.layers.values():
        byte = layer.indices.long() * layer.weight.element_size()
        total += int(torch.unique(byte // LINE).numel())
    return total


def random_adapter(args, seed: int) -> shira_fx.SparseAdapter:
    model = build(args)
    cfg = shira_fx.ShiraConfig(target_modules=TARGETS, density=args.density, seed=seed)
    adapter = shira_fx.prepare(model, cfg, progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_(0, 0.01)
    return adapter


def peft_switch_ms(args, kind: str, r: int) -> float:
    model = build(args)
    if kind == "shira":
        make = lambda: peft.ShiraConfig(r=r, target_modules=TARGETS, init_weights=False)
    else:
        make = lambda: peft.LoraConfig(r=r, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(model, make(), adapter_name="a")
    pm.add_adapter("b", make())
    pm.set_adapter("a")
    pm.merge_adapter()
    names = ["b", "a"]
    state = {"i": 0}

    def switch():
        pm.unmerge_adapter()
        pm.set_adapter(names[state["i"] % 2])
        pm.merge_adapter()
        state["i"] += 1

    with torch.no_grad():
        return median_ms(switch, args.repeat, warmup=0)


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("switch", __doc__)
    p.add_shape(hidden=512, layers=4, vocab=8000)
    p.add_argument("--density", type=float, default=0.025)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--tokens", type=int, default=128, help="sequence length for inference latency")
    args = p.parse(argv, smoke=dict(hidden=64, layers=1, vocab=64, repeat=3, tokens=8))

    a, b = random_adapter(args, 1), random_adapter(args, 2)
    model = build(args)
    bank = shira_fx.AdapterBank(model)
    bank.load("a", a)
    bank.load("b", b)
    nnz = a.num_trainable()
    bank.activate("a")
    bank.activate("b")  # plans built once, as a server would after loading
    order = ["a", "b"]
    state = {"i": 0}

    def switch():
        bank.activate(order[state["i"] % 2])
        state["i"] += 1

    shira_ms = median_ms(switch, args.repeat, warmup=0)
    bandwidth = copy_bandwidth("cpu", mib=64, repeat=15)
    floor_ms = 2 * LINE * (lines_touched(a) + lines_touched(b)) / bandwidth * 1e3
    # PEFT sizes adapters by r: pick the r whose r*(out+in) count is closest to the same nnz
    dims = [(m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    r = max(1, round(nnz / sum(o + i for o, i in dims)))
    peft_shira_ms = peft_switch_ms(args, "shira", r)
    peft_lora_ms = peft_switch_ms(args, "lora", r)

    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    base_t, fused_t = [], []
    with torch.no_grad():
        model(ids)
        for _ in range(max(1, args.repeat // 5)):  # interleaved, so machine noise hits both alike
            bank.deactivate()
            base_t.append(median_ms(lambda: model(ids), 5, warmup=0))
            bank.activate({"a": 1.0, "b": 0.7})
            fused_t.append(median_ms(lambda: model(ids), 5, warmup=0))
        bank.deactivate()
    base_ms, fused_ms = statistics.median(base_t), statistics.median(fused_t)

    rows = {"shira_fx switch (AdapterBank.activate)": shira_ms,
            "PEFT SHiRA switch (unmerge + set_adapter + merge)": peft_shira_ms,
            "PEFT LoRA switch (unmerge + set_adapter + merge)": peft_lora_ms,
            "cache-line floor (old + new adapter)": floor_ms}
    info = machine()
    result = bench_result("switch", info, args, switch_ms=rows, peft_r=r, nnz=nnz,
                          copy_bandwidth_GB_per_s=bandwidth / 1e9,
                          inference_ms={"base": base_ms, "fused": fused_ms},
                          ratios={"vs_peft_shira": ratio(shira_ms, peft_shira_ms),
                                  "vs_floor": ratio(shira_ms, floor_ms),
                                  "fused_vs_base": ratio(fused_ms, base_ms)})
    table = [[name, fmt(ms), fmt(ratio(ms, shira_ms), ".2f", "x")] for name, ms in rows.items()]
    print_table(f"Llama hidden {args.hidden}, {args.layers} layers, all 7 linears, density {args.density} "
                f"({nnz:,} values/adapter; PEFT r={r}), fp32; {describe(info)}",
                ["switch", "ms", "vs shira_fx"], table)
    ratios = result["ratios"]
    print(f"\nshira_fx switch = {fmt(ratios['vs_peft_shira'], '.3f')}x PEFT SHiRA, "
          f"{fmt(ratios['vs_floor'])}x the floor")
    print(f"inference ({args.tokens} tokens): base {base_ms:.2f} ms, fused a+b {fused_ms:.2f} ms "
          f"({fmt(ratios['fused_vs_base'], '.3f')}x)")
    return save(args, result)


if __name__ == "__main__":
    main()
