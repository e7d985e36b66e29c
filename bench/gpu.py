"""One command for a CUDA machine, at most about 8 minutes: the kernel tests on CUDA, then the
masked-gradient bench against a dense dW and against the tensor-core roofline; JSON and
markdown into bench/results (gpu.json, gpu.md).

1. Tests: `pytest tests/test_kernels.py` in a subprocess (the Triton kernels run compiled on
   the GPU, not interpreted), pass/fail and the tail of its output.
2. Rooflines measured here: bf16 and fp32 (IEEE) `torch.mm` TFLOP/s on 8192^2, and the copy
   bandwidth of a 1 GiB `copy_`.
3. Masked gradient per weight size N, T, dtype and mask (random at several densities, and
   struct): `masked_sddmm` with the mask's structure and the cost model's path ("auto"), every
   Triton path forced (gather-dot without and with the structure's tile order, tile kernel), the dense
   `grad_y.T @ x` + gather, and for struct masks a GEMM over just the dense rows. Per method:
   median ms (triton.testing.do_bench), max relative error against an fp32 dense reference,
   time over the dense dW's, and over two rooflines: the dense dW at the measured tensor-core
   rate (what a tile kernel touching every tile costs at best) and reading grad_y and x once
   at the copy bandwidth (what any exact method costs at least). Whether the cost model's pick
   was the fastest path is recorded per point.

    python -m bench.gpu                     # all of it
    python -m bench.gpu --skip-tests --sizes 4096 --tokens 2048
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from bench.common import (
    REPO,
    RESULTS,
    BenchParser,
    bench_result,
    copy_bandwidth,
    describe,
    fmt,
    machine,
    markdown_table,
    median_ms,
    write_json,
)
from bench.kernel_ops import AUTO, DENSE, ROWS_GEMM, mask_indices, sddmm_methods
from shira_fx.kernels.structure import STRUCTURE_FIELDS, mask_structure

DENSITIES = (0.002, 0.01, 0.03)


def run_tests(timeout: int) -> dict:
    """tests/test_kernels.py on this machine's GPU, in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_kernels.py"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, f"timed out after {timeout} s\n{e.stdout or ''}"
    lines = [x for x in out.strip().splitlines() if x.strip()]
    return {"returncode": rc, "passed": rc == 0, "summary": lines[-1] if lines else "",
            "tail": "\n".join(lines[-30:]), "seconds": time.perf_counter() - t0}


def rooflines(device: torch.device) -> dict:
    """Measured dense GEMM rates (the tensor-core roofline) and copy bandwidth."""
    n = 8192
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x = torch.randn(n, n, device=device, dtype=dtype)
        y = torch.randn(n, n, device=device, dtype=dtype)
        ms = median_ms(lambda x=x, y=y: x @ y, 10, device=device)
        out[f"gemm_{name}_TFLOP_per_s"] = 2 * n**3 / (ms / 1e3) / 1e12
        del x, y
    out["copy_GB_per_s"] = copy_bandwidth(device, 1024) / 1e9
    return out


def kernel_rows(n: int, T: int, dtype: torch.dtype, masks: list[str], densities: list[float],
                device: torch.device, roof: dict, repeat: int) -> list[dict]:
    """Every masked-gradient method at one (N, T, dtype), per mask kind and density."""
    g = torch.Generator().manual_seed(n + T)
    grad_y = torch.randn(T, n, generator=g).to(device=device, dtype=dtype)
    x = torch.randn(T, n, generator=g).to(device=device, dtype=dtype)
    perm = torch.randperm(n * n, generator=g).to(device)
    dense_ref = (grad_y.float().t() @ x.float()).view(-1)
    tflops = roof["gemm_bf16_TFLOP_per_s" if dtype != torch.float32 else "gemm_fp32_TFLOP_per_s"] * 1e12
    dense_roof_ms = 2 * T * n * n / tflops * 1e3
    read_roof_ms = 2 * T * n * grad_y.element_size() / (roof["copy_GB_per_s"] * 1e9 / 2) * 1e3
    rows = []
    for kind in masks:
        for d in densities if kind == "rand" else densities[len(densities) // 2:][:1]:
            idx = mask_indices(kind, n, max(1, round(d * n * n)), perm)
            nnz = idx.shape[0]
            structure = mask_structure(idx, n, n)
            parts = dict(zip(STRUCTURE_FIELDS, structure, strict=True)) if structure else {}
            methods = sddmm_methods(grad_y, x, idx, n, structure, kind, device)
            ref = dense_ref[idx.long()]
            scale = ref.abs().max().item() or 1.0
            ms, errs = {}, {}
            for name, (fn, _) in methods.items():
                out = fn().reshape(-1).float()
                want = ref if out.numel() == ref.numel() else dense_ref.view(n, n)[parts["rows"]].reshape(-1)
                errs[name] = (out - want).abs().max().item() / scale
                ms[name] = median_ms(fn, repeat, device=device)
            paths = {name: p for name, (_, p) in methods.items()}
            auto = next(k for k in methods if k.startswith(f"{AUTO} (auto"))
            candidates = {k: v for k, v in ms.items() if k.startswith(AUTO) and k != auto}
            fastest = min(candidates, key=candidates.get)
            for name in methods:
                rows.append({
                    "size": n, "tokens": T, "dtype": str(dtype).replace("torch.", ""), "mask": kind,
                    "density": d, "nnz": nnz, "tiles": int(parts["tile_ids"].numel()) if structure else None,
                    "method": name, "path": paths[name], "median_ms": ms[name], "max_rel_err": errs[name],
                    "vs_dense": ms[name] / ms[DENSE], "vs_dense_roofline": ms[name] / dense_roof_ms,
                    "vs_read_roofline": ms[name] / read_roof_ms,
                    "useful_TFLOP_per_s": 2 * T * nnz / (ms[name] / 1e3) / 1e12,
                    "vs_rows_gemm": ms[name] / ms[ROWS_GEMM] if ROWS_GEMM in ms else None,
                    "auto_is_fastest": paths[auto] == paths[fastest] and ms[auto] <= 1.1 * ms[fastest],
                })
            print(f"  N={n} T={T} {rows[-1]['dtype']} {kind} {d * 100:g} %: "
                  + ", ".join(f"{paths[k]} {v:.3f}" for k, v in ms.items()), file=sys.stderr)
    return rows


def markdown(result: dict) -> str:
    roof = result["rooflines"]
    out = [f"# GPU bench ({time.strftime('%Y-%m-%d')})", "", f"{describe(result['machine'])}", "",
           f"Rooflines measured here: bf16 GEMM {roof['gemm_bf16_TFLOP_per_s']:.0f} TFLOP/s, fp32 (IEEE) "
           f"GEMM {roof['gemm_fp32_TFLOP_per_s']:.1f} TFLOP/s, copy {roof['copy_GB_per_s']:.0f} GB/s.", ""]
    tests = result.get("tests")
    if tests:
        out += [f"Kernel tests on CUDA: {'pass' if tests['passed'] else 'FAIL'} ({tests['summary']})", ""]
    rows = [[r["size"], r["tokens"], r["dtype"], r["mask"], f"{r['density'] * 100:g} %", f"{r['nnz']:,}",
             r["method"], fmt(r["median_ms"], ".3f"), fmt(r["useful_TFLOP_per_s"], ".2f"),
             fmt(r["vs_dense"], ".3f"), fmt(r["vs_dense_roofline"], ".2f"), fmt(r["vs_read_roofline"], ".1f"),
             fmt(r["vs_rows_gemm"], ".2f"), f"{r['max_rel_err']:.1e}"] for r in result["rows"]]
    out.append(markdown_table(["N", "T", "dtype", "mask", "density", "nnz", "method", "ms", "useful TFLOP/s",
                               "vs dense dW", "vs dense roofline", "vs read roofline", "vs rows GEMM",
                               "max rel err"], rows, align="rrrlrrlrrrrrrr"))
    autos = [r for r in result["rows"] if r["method"].startswith(f"{AUTO} (auto")]
    if autos:
        agree = sum(r["auto_is_fastest"] for r in autos)
        out += ["", f"Cost model's pick within 10 % of the fastest path at {agree} of {len(autos)} points."]
    return "\n".join(out) + "\n"


def training(out: str) -> dict:
    """bench.train on the GPU: a Llama of hidden 2048, 4 layers, bf16, batch 4x1024, all 7
    linears, compiled: shira_fx (rand and struct) vs PEFT LoRA vs PEFT SHiRA; step time and
    `max_memory_allocated`, written beside gpu.json as train_gpu.json."""
    from bench import train

    return train.main(["--sizes", "2048x4", "--batch", "4", "--seq", "1024", "--device", "cuda",
                       "--dtype", "bfloat16", "--modes", "compiled", "--steps", "6", "--rounds", "2",
                       "--variants", "PEFT LoRA,PEFT SHiRA,shira_fx,shira_fx struct",
                       "--json", os.path.join(out, "train_gpu.json")])


def main(argv: list[str] | None = None) -> dict:
    p = BenchParser("gpu", __doc__, smoke=None)
    p.add_argument("--sizes", default="4096,8192", help="square weight sides N")
    p.add_argument("--tokens", default="2048,8192", help="T values")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--masks", default="rand,struct,rows")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=420, help="stop starting new bench points after this")
    p.add_argument("--test-timeout", type=int, default=150)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--out", default=RESULTS, help="folder for gpu.json and gpu.md")
    args = p.parse(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.gpu needs a CUDA GPU (torch.cuda.is_available() is False here); on CPU run "
                 "`python -m bench.kernel_ops` and `python -m pytest tests/test_kernels.py` instead")
    device = torch.device("cuda")
    t0 = time.perf_counter()
    result: dict = bench_result("gpu", machine(device), args)
    if not args.skip_tests:
        result["tests"] = run_tests(args.test_timeout)
        print(f"kernel tests: {result['tests']['summary']}", file=sys.stderr)
    result["rooflines"] = rooflines(device)
    rows: list[dict] = []
    skipped = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for n in [int(s) for s in args.sizes.split(",")]:
            for T in [int(t) for t in args.tokens.split(",")]:
                if time.perf_counter() - t0 > args.budget_s:
                    skipped.append(f"N={n} T={T} {dtype}")
                    continue
                rows += kernel_rows(n, T, dtype, args.masks.split(","),
                                    [float(d) for d in args.densities.split(",")], device,
                                    result["rooflines"], args.repeat)
                torch.cuda.empty_cache()
    result.update(rows=rows, skipped_for_time=skipped, seconds=time.perf_counter() - t0)
    if not args.skip_training:
        result["training"] = training(args.out)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "gpu.json"), result)
    text = markdown(result)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
