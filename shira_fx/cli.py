"""`shira-fx` command line (also `python -m shira_fx`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shira-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train SHiRA vs PEFT LoRA on a generated Llama; print a table")
    demo.add_argument("--steps", type=int, default=40, help="optimizer steps per adapter")
    demo.add_argument("--hidden", type=int, default=256, help="Llama hidden size")
    demo.add_argument("--layers", type=int, default=4, help="decoder layers")
    demo.add_argument("--r", type=int, default=8, help="LoRA rank; SHiRA gets r*(out+in) per weight")
    demo.add_argument("--inner", default="inductor", help="inner compiler: inductor, aot_eager, eager")
    demo.add_argument("--smoke", action="store_true", help="tiny shapes and 3 steps (for tests)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        if args.smoke:
            run(steps=3, hidden=64, layers=1, vocab=64, batch=2, seq=16, r=2, inner=args.inner)
        else:
            run(steps=args.steps, hidden=args.hidden, layers=args.layers, r=args.r, inner=args.inner)


if __name__ == "__main__":
    main()
