"""Helpers shared by the bench scripts: one command line (`BenchParser`: --json, --smoke and the
options several benches share), one timer, one copy-bandwidth yardstick, one way to describe the
machine, print markdown tables and write JSON, so every bench is run and reports alike."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from shira_fx.memory import LiveTensorTracker, resident_state, saved_tensor_bytes
from shira_fx.timing import median_ms  # noqa: F401  (the one timer, re-exported for the benches)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_json(name: str) -> str:
    """bench/results/<name>.json: where plot.py looks for each bench's results."""
    return os.path.join(RESULTS, f"{name}.json")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """What produced the numbers: timings only compare within one machine description."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": sys.platform,
    }
    for name in ("triton", "transformers", "peft"):
        mod = sys.modules.get(name)
        if mod is not None:
            info[name] = getattr(mod, "__version__", "?")
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for the table caption."""
    where = info.get("gpu") or f"{info['cpu']}, {info['threads']} threads"
    return f"{where}, torch {info['torch']}"


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is 0 (JSON has no inf)."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable(value: Any) -> Any:
    """A path recorded in results, made repo-relative (or reduced to its file name when it lies
    outside the repository): results never name the machine they ran on."""
    if isinstance(value, str) and os.path.isabs(value):
        rel = os.path.relpath(value, REPO)
        return os.path.basename(value) if rel.startswith("..") else rel
    return value


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write atomically (a half-written file would break plot.py); non-finite floats become
    null so the file stays valid JSON, and recorded paths are made portable."""
    if isinstance(data.get("args"), dict):
        data = {**data, "args": {k: portable(v) for k, v in data["args"].items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_finite(data), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell: '-' for a missing value."""
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table. `align` has one letter per column, l or r; by default the first
    column (a name) is left-aligned and the rest (numbers) right-aligned."""
    align = align or "l" + "r" * (len(headers) - 1)
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def llama(hidden: int, layers: int, vocab: int, seq: int, device: torch.device | str = "cpu"):
    """A Llama built from a config (no download), the same weights on every call (seeded):
    intermediate 11/4 x hidden, one head per 64 channels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=max(64, seq)))
    return model.to(device)


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and repeats count once; for a
    DTensor, this rank's local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def copy_bandwidth(device: torch.device | str = "cpu", mib: int = 256, repeat: int = 10) -> float:
    """Bytes per second (read + write) of `dst.copy_(src)` on buffers far larger than the
    last-level cache: the practical memory bandwidth the O(nnz) ops are judged against."""
    src = torch.empty(mib * 2**20 // 4, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeat, warmup=2, device=device)
    return 2 * src.numel() * 4 / (ms / 1e3)


# -- the command line every bench shares ---------------------------------------------------------

SHAPE_HELP = {
    "hidden": "hidden size",
    "layers": "decoder layers",
    "vocab": "vocabulary size",
    "batch": "sequences per batch",
    "seq": "tokens per sequence",
    "r": "LoRA rank r; SHiRA gets its count r*(out+in) per weight",
}


class BenchParser(argparse.ArgumentParser):
    """A bench's command line (`python -m bench.<name>`): the module docstring as its help,
    `--json` (default bench/results/<name>.json; none with --smoke unless `json_with_smoke`)
    and `--smoke` (help text `smoke`; None: no --smoke and no --json), one method per option
    that several benches share, and `parse`, which applies --smoke's settings and the defaults
    that depend on them."""

    def __init__(self, name: str, doc: str | None, *, smoke: str | None = "tiny shapes, for the test suite",
                 json_with_smoke: bool = False):
        super().__init__(prog=f"python -m bench.{name}", description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.bench_name, self.json_with_smoke = name, json_with_smoke
        self.has_smoke = smoke is not None
        self.compiler_defaults: tuple[str, str] | None = None
        if self.has_smoke:
            where = default_json(name)
            self.add_argument("--json", default=None, help=f"results file (default {where}"
                              + (")" if json_with_smoke else "; none with --smoke)"))
            self.add_argument("--smoke", action="store_true", help=smoke)

    def add_shape(self, **defaults: int | tuple[int, str]) -> None:
        """Integer model-shape options (hidden, layers, vocab, batch, seq, r), each given as its
        default or as (default, help)."""
        for key, value in defaults.items():
            default, help_ = value if isinstance(value, tuple) else (value, SHAPE_HELP[key])
            self.add_argument(f"--{key}", type=int, default=default, help=help_)

    def add_device(self) -> None:
        self.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    def add_threads(self, help: str, default: int | None = None) -> None:
        self.add_argument("--threads", type=int, default=default, help=help)

    def add_compiler(self, default: str = "inductor", smoke: str = "aot_eager",
                     help: str | None = None) -> None:
        """--compiler: the inner compiler; unset, `smoke` under --smoke and `default` otherwise."""
        self.compiler_defaults = (default, smoke)
        self.add_argument("--compiler", default=None,
                          help=help or f"inner compiler of compiled rows (default {default})")

    def parse(self, argv: Sequence[str] | None = None,
              smoke: Mapping[str, Any] | None = None) -> argparse.Namespace:
        """Parse `argv`; under --smoke set every option in `smoke` to its value (whatever was
        given), then fill in --compiler and --json where they were not given."""
        args = self.parse_args(argv)
        on_smoke = self.has_smoke and args.smoke
        if on_smoke:
            for key, value in (smoke or {}).items():
                if not hasattr(args, key):
                    raise AttributeError(f"BenchParser.parse: --smoke sets {key!r}, which is no option")
                setattr(args, key, value)
        if self.compiler_defaults is not None:
            args.compiler = args.compiler or self.compiler_defaults[1 if on_smoke else 0]
        if self.has_smoke and args.json is None and (self.json_with_smoke or not on_smoke):
            args.json = default_json(self.bench_name)
        return args


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to `n` inside (unchanged for None), restored after."""
    before = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


def recompile_limit(at_least: int = 64) -> None:
    """Raise Dynamo's recompile limit: benches keep many rows compiled at once (interleaved
    timing), each compiling the same model frames, past the default of 8 per code object."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, at_least)


# -- training rows, side by side -----------------------------------------------------------------


class TrainingRow:
    """One (method, mode) row of a training table. A subclass sets `model`, `params` (what
    trains), `opt`, `method` and `mode` ("eager" or "compiled"), and defines `loss()`; `step`
    times one optimizer step, `measure` the bytes held for backward (parameters and buffers
    excluded) and, eagerly, the step's peak of live tensors (shira_fx's dispatch-level tracker,
    one yardstick for every method; compiled graphs' own buffers bypass it)."""

    model: torch.nn.Module
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer
    method: str
    mode: str

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> float:
        t0 = time.perf_counter()
        self.loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def measure(self) -> dict[str, Any]:
        held, loss = saved_tensor_bytes(self.loss, exclude=resident_state(self.model))
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        peak = None
        if self.mode == "eager":
            with LiveTensorTracker() as tracker:
                self.step()
            peak = tracker.peak_bytes / 2**20
        return {"method": self.method, "mode": self.mode, "trainable": sum(p.numel() for p in self.params),
                "held_for_backward_MiB": held / 2**20, "step_peak_MiB": peak}


def train_side_by_side(rows: Sequence[TrainingRow], steps: int) -> list[dict[str, Any]]:
    """Each row warmed up (compiled) and measured, then `steps` rounds of one timed step per
    row, interleaved so that a shared machine's noise hits every row alike; each result gets
    its median `step_ms`."""
    results = []
    for r in rows:
        r.step()
        results.append(r.measure())
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(steps):
        for r, t in zip(rows, times, strict=True):
            t.append(r.step())
    for result, t in zip(results, times, strict=True):
        result["step_ms"] = statistics.median(t) * 1e3
    return results


def add_ratios_vs(results: list[dict[str, Any]], baseline: str, same: Sequence[str] = ("mode",)) -> None:
    """`held_vs_lora`, `peak_vs_lora`, `step_vs_lora`: each result over the result of method
    `baseline` that agrees with it on the keys `same`."""
    for row in results:
        base = next(x for x in results if x["method"] == baseline and all(x[k] == row[k] for k in same))
        row["held_vs_lora"] = ratio(row["held_for_backward_MiB"], base["held_for_backward_MiB"])
        row["peak_vs_lora"] = ratio(row["step_peak_MiB"], base["step_peak_MiB"])
        row["step_vs_lora"] = ratio(row["step_ms"], base["step_ms"])


# -- what every bench reports --------------------------------------------------------------------


def bench_result(name: str, info: dict[str, Any], args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """A bench's result: its name, the machine, its arguments, then its own fields (plot.py and
    the tests rely on the first three)."""
    return {"bench": name, "machine": info, "args": vars(args), **fields}


def print_table(caption: str | None, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                align: str | None = None) -> None:
    """A caption between blank lines (when given), then the markdown table."""
    if caption is not None:
        print(f"\n{caption}\n")
    print(markdown_table(headers, rows, align))


def verdict(ok: bool | None) -> str:
    """A target's line prefix: pass, MISS, or n/a when it could not be measured."""
    return "n/a" if ok is None else ("pass" if ok else "MISS")


def save(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    """Write `result` to --json when there is one; return it (every bench's `main` ends here)."""
    if args.json:
        write_json(args.json, result)
    return result
