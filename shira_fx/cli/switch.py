"""`shira-fx switch`: serve trained adapters from one `AdapterBank` and measure what serving
cares about: switch latency, fused activation, the positions adapters share, and (given task
data) each adapter's accuracy alone and fused with the others (concept loss in fusion)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ShiraError
from ..serve.bank import AdapterBank
from ..timing import median_ms


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=PATH` or `PATH` (named after the file) -> {name: path}; names must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec.rstrip("/")).name.split(".")[0]
        if name in out:
            raise ShiraError(f"adapter name {name!r} given twice")
        if not os.path.exists(path):
            raise ShiraError(f"adapter {name!r}: {path} does not exist")
        out[name] = path
    return out


def switch_times(bank: AdapterBank, names: list[str], repeat: int) -> dict[str, float]:
    """Median ms of: activating each adapter from the base, switching between adapters,
    fusing all of them, and restoring the base."""
    out = {}
    for name in names:
        out[f"activate {name} (from base)"] = median_ms(
            lambda name=name: bank.activate(name), repeat, setup=bank.deactivate)
    if len(names) > 1:
        turn = iter(range(10**9))
        out[f"switch among {len(names)}"] = median_ms(
            lambda: bank.activate(names[next(turn) % len(names)]), repeat)
        out["fuse all (weights 1)"] = median_ms(
            lambda: bank.activate(dict.fromkeys(names, 1.0)), repeat, setup=bank.deactivate)
    out["deactivate (restore base)"] = median_ms(
        bank.deactivate, repeat, setup=lambda: bank.activate(names[0]))
    return out


@torch.no_grad()
def fused_accuracy(model, bank: AdapterBank, heads: Mapping[str, torch.nn.Module],
                   tests: Mapping[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """For each adapter with a head and test data: accuracy with its adapter alone and with all
    adapters fused (weights 1), its own head in both cases."""
    from ..finetune import accuracy

    names = list(tests)
    alone = {}
    for name in names:
        bank.activate(name)
        model.head = heads[name]
        alone[name] = accuracy(model, tests[name])
    bank.activate(dict.fromkeys(bank.names, 1.0))
    fused = {}
    for name in names:
        model.head = heads[name]
        fused[name] = accuracy(model, tests[name])
    bank.deactivate()
    return {n: (alone[n], fused[n]) for n in names}


def run_switch(specs: list[str], model: str | None = "minilm", data: str | None = None,
               repeat: int = 20, seq: int = 48, test_size: int = 1000, layers: int | None = None) -> dict:
    from ..datasets import load_task, resolve_model
    from ..finetune import head_path, load_head, make_classifier, tokenize

    adapters = parse_adapters(specs)
    path = resolve_model(model)
    classifier = make_classifier(1, layers, path=path)
    bank = AdapterBank(classifier)
    for name, file in adapters.items():
        bank.load(name, file)
    names = list(adapters)
    times = switch_times(bank, names, repeat)
    print(f"\n{len(names)} adapter(s) on {path.name}; median of {repeat}\n")
    print("| operation | ms |\n|---|---:|")
    for op, ms in times.items():
        print(f"| {op} | {ms:.3f} |")
    if len(names) > 1:
        print("\n| adapters | shared positions |\n|---|---:|")
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                print(f"| {a} & {b} | {bank.overlap(a, b):,} |")
    result = {"times_ms": times}
    if data:
        pairs = dict(p.split("=", 1) for p in data.split(",") if "=" in p)
        unknown = set(pairs) - set(names)
        if unknown or not pairs:
            raise ShiraError(f"--data wants NAME=TASK pairs for loaded adapters; got {data!r}")
        hidden = classifier.backbone.config.hidden_size
        heads, tests = {}, {}
        for name, task_name in pairs.items():
            head, classes = load_head(head_path(adapters[name]), hidden)
            task = load_task(task_name, test_size=test_size)
            if classes != task.classes:
                raise ShiraError(f"adapter {name!r}: its head predicts {classes}, task {task_name!r} "
                                 f"has {task.classes}")
            heads[name] = head
            tests[name] = tokenize(task.test_texts, task.test_labels, seq, min(100, test_size), path)
        acc = fused_accuracy(classifier, bank, heads, tests)
        print("\n| adapter | task | accuracy alone | fused with all | change |\n|---|---|---:|---:|---:|")
        for name, (a, f) in acc.items():
            print(f"| {name} | {pairs[name]} | {a * 100:.1f} % | {f * 100:.1f} % | {(f - a) * 100:+.1f} |")
        result["accuracy"] = acc
    return result
