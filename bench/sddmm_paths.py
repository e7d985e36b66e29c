"""Every masked-gradient path against the one the cost model picks, at the layer shapes of the
training bench's models (bench/train.py: Llamas of hidden h, intermediate 11/4 h, every linear
adapted at PEFT's budget r*(out+in) per weight, T = batch x seq tokens).

Per weight shape (out, in) = (h, h), (11h/4, h), (h, 11h/4), rank r and mask (rand; struct:
rows at a stride plus the diagonal, as prepare builds them), the masked gradient of one layer's
backward, `masked_grad(grad_y, x)` with the mask's structure, is timed

- as the dispatcher runs it ("auto": the cost model's path for the rest, dense rows as a GEMM,
  diagonals streamed), and with each CPU path forced for the rest (struct masks have no rest: the
  paths then run over the whole mask, without its structure, to show what the structure saves);
- beside PEFT LoRA r's extra matmuls for the same layer (x A^T, then B; the backward's dB, dA and
  its input-gradient term): what the adapter's gradient competes with.

Times are interleaved (every method once per round, the median over rounds and the spread of the
middle half), so a shared machine's noise hits all alike; on one thread `--timer thread` counts
this thread's CPU time only. The picks that were not the fastest (by more than `--slack`) are
listed with the cost model's estimates.

    python -m bench.sddmm_paths                       # h 256, 512, 2048; r 8, 32; rand, struct
    python -m bench.sddmm_paths --threads 1 --timer thread --hidden 512
    python -m bench.sddmm_paths --smoke
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

from bench.common import BenchParser, bench_result, describe, fmt, machine, print_table, save, torch_threads
from shira_fx.kernels.masked_sddmm import CPU_PATHS, choose_path, masked_sddmm, path_costs
from shira_fx.kernels.structure import STRUCTURE_FIELDS, mask_structure
from shira_fx.masks import struct_mask

GATHER_LIMIT = 1 << 24  # plain gathers beyond this many multiply-adds take seconds: skipped
LORA = "PEFT LoRA extra matmuls"


def layer_shapes(hidden: int) -> list[tuple[str, int, int]]:
    inter = hidden * 11 // 4
    return [("q/k/v/o", hidden, hidden), ("gate/up", inter, hidden), ("down", hidden, inter)]


def mask_of(kind: str, out: int, inp: int, nnz: int, g: torch.Generator) -> torch.Tensor:
    if kind == "rand":
        return torch.randperm(out * inp, generator=g)[:nnz].sort().values.to(torch.int32)
    return struct_mask(out, inp, nnz, 0, False)


def lora_extra(x: torch.Tensor, gy: torch.Tensor, r: int, g: torch.Generator) -> Callable[[], object]:
    """LoRA's extra work for one layer, forward and backward: h = x A^T, y += h B^T; dB = gy^T h,
    dh = gy B, dA = dh^T x, dx += dh A."""
    a_w = torch.randn(r, x.shape[1], generator=g)
    b_w = torch.randn(gy.shape[1], r, generator=g)

    def run():
        h = x @ a_w.t()
        y = h @ b_w.t()
        dh = gy @ b_w
        return y, gy.t() @ h, dh.t() @ x, dh @ a_w

    return run


def interleaved(fns: dict[str, Callable], rounds: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append((clock() - t0) * 1e3)
    return times


def spread(v: list[float]) -> tuple[float, float, float]:
    s = sorted(v)
    return s[len(s) // 4], statistics.median(s), s[(3 * len(s)) // 4]


def measure_point(name: str, out: int, inp: int, r: int, kind: str, T: int, rounds: int,
                  clock: Callable[[], float], g: torch.Generator) -> dict:
    nnz = min(out * inp, r * (out + inp))
    idx = mask_of(kind, out, inp, nnz, g)
    structure = mask_structure(idx, out, inp)
    parts = dict(zip(STRUCTURE_FIELDS, structure, strict=True)) if structure else {}
    rest = parts["rest"].numel() if structure else idx.numel()
    gy, x = torch.randn(T, out, generator=g), torch.randn(T, inp, generator=g)
    tiles = parts["tile_ids"].numel() if structure else None
    pick = choose_path("cpu", gy.dtype, x.dtype, T, out, inp, rest, tiles) if rest else "dense parts only"
    # forced paths run over the rest; without a rest (struct), over the whole mask without structure
    forced_structure = structure if rest else []
    m = rest or idx.numel()
    estimates = path_costs("cpu", gy.dtype, x.dtype, T, out, inp, m, tiles if rest else None)
    fns: dict[str, Callable] = {"auto": lambda: masked_sddmm(gy, x, idx, inp, structure)}
    for path in CPU_PATHS:
        if path == "torch_gather" and m * T > GATHER_LIMIT:
            continue
        if path == "cpp_rowdot" and path not in estimates:
            continue  # the C++ kernels did not build here
        fns[path] = lambda path=path: masked_sddmm(gy, x, idx, inp, forced_structure, path=path)
    fns[LORA] = lora_extra(x, gy, r, g)
    ref = (gy.double().t() @ x.double()).view(-1)[idx.long()]
    scale = ref.abs().max().item() or 1.0
    errors = {k: ((f().double() - ref).abs().max().item() / scale) for k, f in fns.items() if k != LORA}
    times = interleaved(fns, rounds, clock)
    ms = {k: spread(v) for k, v in times.items()}
    paths = [k for k in fns if k in CPU_PATHS]
    fastest = min(paths, key=lambda k: ms[k][1])
    row = {"layer": name, "out": out, "in": inp, "r": r, "mask": kind, "tokens": T, "nnz": nnz,
           "density": nnz / (out * inp), "rest": rest,
           "dense_rows": parts["rows"].numel() if structure else 0,
           "diagonal": parts["diag"].numel() if structure else 0, "pick": pick, "fastest_path": fastest,
           "ms": {k: v[1] for k, v in ms.items()}, "ms_q25": {k: v[0] for k, v in ms.items()},
           "ms_q75": {k: v[2] for k, v in ms.items()},
           "estimates_ms": {k: v * 1e3 for k, v in estimates.items()}, "max_rel_err": errors}
    row["auto_vs_fastest_path"] = ms["auto"][1] / ms[fastest][1]
    row["auto_vs_lora"] = ms["auto"][1] / ms[LORA][1]
    print(f"  h-shape {name} {out}x{inp} r={r} {kind} T={T}: pick {pick}, "
          + ", ".join(f"{k} {v[1]:.2f}" for k, v in ms.items()), file=sys.stderr)
    return row


def print_rows(result: dict) -> None:
    rows = result["rows"]
    args = result["args"]
    headers = ["layer", "out x in", "r", "mask", "density", "rest", "pick", "auto ms (q25-q75)"] + [
        f"{p} ms" for p in CPU_PATHS] + [f"{LORA} ms", "auto / fastest path", "auto / LoRA", "max rel err"]
    table = []
    for r in rows:
        a = r["ms"]
        table.append([r["layer"], f"{r['out']}x{r['in']}", r["r"], r["mask"], f"{r['density'] * 100:.2f} %",
                      f"{r['rest']:,}", r["pick"], f"{a['auto']:.2f} ({r['ms_q25']['auto']:.2f}-"
                      f"{r['ms_q75']['auto']:.2f})"]
                     + [fmt(a.get(p), ".2f") for p in CPU_PATHS]
                     + [fmt(a[LORA], ".2f"), fmt(r["auto_vs_fastest_path"], ".2f"),
                        fmt(r["auto_vs_lora"], ".2f"), f"{max(r['max_rel_err'].values()):.1e}"])
    print_table(f"Masked gradient of one layer, T = {args['tokens']}, {describe(result['machine'])}; "
                "struct masks' paths run over the whole mask without its structure",
                headers, table, align="llrllrl" + "r" * (len(headers) - 7))
    print()
    for line in result["misses"]:
        print(line)


def misses(rows: list[dict], slack: float) -> list[str]:
    """The points where the cost model's path was not the fastest path by more than `slack`."""
    out = []
    for r in rows:
        if r["pick"] not in r["ms"]:
            continue  # dense parts only: no path to pick
        ratio = r["ms"][r["pick"]] / r["ms"][r["fastest_path"]]
        if ratio > 1 + slack:
            est = ", ".join(f"{k} {v:.2f}" for k, v in r["estimates_ms"].items())
            out.append(f"pick not fastest: {r['layer']} {r['out']}x{r['in']} r={r['r']} {r['mask']}: "
                       f"{r['pick']} {r['ms'][r['pick']]:.2f} ms vs {r['fastest_path']} "
                       f"{r['ms'][r['fastest_path']]:.2f} ms ({ratio:.2f}x; estimates ms: {est})")
    if not out:
        out.append(f"the cost model's pick was the fastest path (within {slack:.0%}) at every point")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("sddmm_paths", __doc__, smoke="one small shape, 2 rounds")
    p.add_argument("--hidden", default="256,512,2048", help="model widths h, comma-separated")
    p.add_argument("--ranks", default="8,32", help="ranks r, comma-separated")
    p.add_argument("--masks", default="rand,struct")
    p.add_argument("--tokens", type=int, default=1024, help="T = batch x seq (bench/train.py: 4 x 256)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--slack", type=float, default=0.1,
                   help="a pick within this fraction of the fastest path counts as the fastest")
    p.add_threads("torch CPU threads (default: torch's)")
    p.add_argument("--timer", default="wall", choices=["wall", "thread"],
                   help="wall time, or this thread's CPU time (with --threads 1)")
    args = p.parse(argv, smoke=dict(hidden="64", ranks="2", tokens=32, rounds=2))
    clock = time.thread_time if args.timer == "thread" else time.perf_counter
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    t0 = time.perf_counter()
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch_threads(args.threads):
        if args.timer == "thread" and torch.get_num_threads() != 1:
            p.error("--timer thread measures one thread: use it with --threads 1")
        info = machine("cpu")
        for hidden in (int(h) for h in args.hidden.split(",")):
            for r in (int(x) for x in args.ranks.split(",")):
                for kind in args.masks.split(","):
                    for name, out, inp in layer_shapes(hidden):
                        rows.append(measure_point(name, out, inp, r, kind, args.tokens, args.rounds,
                                                  clock, g))
    result = bench_result("sddmm_paths", info, args, rows=rows, misses=misses(rows, args.slack),
                          seconds=time.perf_counter() - t0)
    print_rows(result)
    return save(args, result)


if __name__ == "__main__":
    main()
