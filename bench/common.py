"""Helpers shared by the bench scripts: one timer, one copy-bandwidth yardstick, one way to
describe the machine, print markdown tables and write JSON, so every bench reports alike."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

from shira_fx.cli.timing import median_ms  # noqa: F401  (the one timer, re-exported for the benches)

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
