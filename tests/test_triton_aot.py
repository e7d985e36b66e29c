"""GPU readiness without a GPU: every Triton kernel, in every launch signature the kernel tests
give it, compiles ahead of time for sm_80 and sm_90, and ptxas reports no register spills.

The launches are recorded, not run: the launchers (`sddmm`, `sddmm_tiles`, `dense_block`,
`scatter_fused_`) are called over the dtypes, index dtypes, layouts and size classes the
kernel tests use, with each kernel replaced by a recorder of its arguments; each distinct
specialisation (argument types, divisibility, constexprs) is then compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` and the PTX passed to the
ptxas shipped in the triton wheel with `-v`. This runs in a subprocess without
TRITON_INTERPRET: the interpreter patches triton.language when a kernel calls a jit'd
library function (tl.sum), which breaks compiling in the same process.

    python tests/test_triton_aot.py      # prints the registers/shared memory table
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
# shared memory per block (bytes) the compiled kernels may use: sm_80 and sm_90 opt-in maxima
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, name: str, kernel, log: list) -> None:
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.kernel, args, kwargs))

        return launch


def record_launches() -> list[tuple]:
    """(name, kernel, args, kwargs) for every launch of the kernel tests' parameter space."""
    import torch

    sddmm_mod = importlib.import_module("shira_fx.kernels.sddmm")
    scatter_mod = importlib.import_module("shira_fx.kernels.scatter")
    from shira_fx.kernels.structure import STRUCTURE_FIELDS, mask_structure

    log: list = []
    names = [(sddmm_mod, "_gather_dot_kernel"), (sddmm_mod, "_tile_kernel"),
             (sddmm_mod, "_dense_block_kernel"), (scatter_mod, "_scatter_kernel")]
    saved = {(m, n): getattr(m, n) for m, n in names}
    for (m, n), kernel in saved.items():
        setattr(m, n, _Recorder(n, kernel, log))
    try:
        floats = [torch.float32, torch.bfloat16, torch.float16]
        f32, bf16, f16, i32, i64 = torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64
        # (dtype of a, of b, index dtype, a column-major, sizes): the kernel tests' dtypes and
        # layouts, at odd sizes (no divisibility specialisation) and at multiples of 16
        odd, aligned = (70, 33, 45), (128, 64, 96)
        cases = [(f32, f32, i32, False, odd), (f32, f32, i32, True, odd), (bf16, bf16, i32, False, odd),
                 (bf16, bf16, i32, True, odd), (bf16, bf16, i64, False, odd), (f16, f16, i32, False, odd),
                 (f32, f32, i32, False, aligned), (bf16, bf16, i32, False, aligned),
                 # mixed and fp64 inputs: their dot dtype is fp32
                 (bf16, f16, i64, False, odd), (torch.float64, torch.float64, i64, False, odd)]
        for dtype_a, dtype_b, idx_dtype, col_major, (t, rows, cols) in cases:
            a = torch.randn(t, rows).to(dtype_a)
            a = a.t().contiguous().t() if col_major else a
            b = torch.randn(t, cols).to(dtype_b)
            idx = torch.arange(0, rows * cols, 7, dtype=idx_dtype)
            structure = mask_structure(idx, rows, cols, min_fill=2.0, min_nnz=0)
            plan = dict(zip(STRUCTURE_FIELDS, structure, strict=True))
            sddmm_mod.sddmm(a, b, idx, cols)
            sddmm_mod.sddmm_tiles(a, b, plan["rest"], cols, plan["tile_ptr"], plan["tile_ids"])
            sddmm_mod.dense_block(a, b, rows=torch.tensor([1, 5]))
            if idx_dtype == i32:  # the gathered index lists are int64 whatever the mask's
                sddmm_mod.dense_block(a, b, cols=torch.tensor([0, 2, 3]))
        for w_dtype in floats:
            for idx_dtype in (torch.int32, torch.int64):
                for d_dtype in {None, torch.float32, w_dtype}:
                    w = torch.zeros(40, 40, dtype=w_dtype)
                    idx = torch.arange(0, 1600, 3, dtype=idx_dtype)
                    base = torch.zeros(idx.shape[0], dtype=w_dtype)
                    delta = None if d_dtype is None else [torch.zeros(idx.shape[0], dtype=d_dtype)]
                    scatter_mod.scatter_fused_([w], [idx], [base], delta, 0.5)
    finally:
        for (m, n), kernel in saved.items():
            setattr(m, n, kernel)
    return log


def _compile(name: str, kernel, args: tuple, kwargs: dict, cap: int) -> dict:
    """Compile one launch for compute capability `cap` and read ptxas -v's report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    record = {"kernel": name, "arch": f"sm_{cap}",
              "constexprs": {jit.params[k[0]].name: str(v) for k, v in constexprs.items()},
              "signature": {k: v for k, v in signature.items() if v != "constexpr"}}
    compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(cap).path, "-v", "--regAllocOptLevel=2", *fmad,
               f"--gpu-name={sm_arch_from_capability(cap)}", ptx, "-o", os.path.join(tmp, "kernel.o")]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    record.update(registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                  spill_bytes=sum(spills), shared_bytes=int(compiled.metadata.shared),
                  num_warps=int(compiled.metadata.num_warps), num_stages=int(compiled.metadata.num_stages))
    return record


def _key(launch: tuple, cap: int) -> str:
    """The specialisation a launch compiles to (its argument types, alignment, constexprs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    name, kernel, args, kwargs = launch
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    backend = make_backend(GPUTarget("cuda", cap, 32))
    _, specialization, options = create_function_from_signature(jit.signature, jit.params, backend)(
        *args, **kwargs)
    return f"{name}|{cap}|{specialization}|{options}"


def compile_all(workers: int = 2) -> list[dict]:
    """Compile every distinct recorded launch for every arch; one record per compile."""
    launches = record_launches()
    jobs = {}
    for launch in launches:
        for cap in ARCHS:
            jobs.setdefault(_key(launch, cap), (launch, cap))
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_compile, *launch, cap) for launch, cap in jobs.values()]
        return [f.result() for f in futures]


def summary_table(records: list[dict]) -> str:
    """Markdown: per kernel, input dtype and arch, the signatures compiled and the range of
    their registers and shared memory."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        # the first pointer's element type: a's for the SDDMM kernels, the table's for the scatter
        first = next(v for v in r["signature"].values() if v.startswith("*"))
        dtype = r["constexprs"].get("W_DTYPE", first[1:])
        groups.setdefault((r["kernel"], dtype, r["arch"]), []).append(r)

    def span(values, fmt="{}"):
        lo, hi = min(values), max(values)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"

    lines = ["| kernel | input dtype | arch | signatures | registers | shared KiB | spill bytes "
             "| warps/stages |", "|---|---|---|---:|---:|---:|---:|---|"]
    for (kernel, dtype, arch), rs in sorted(groups.items()):
        configs = sorted({f"{r['num_warps']}/{r['num_stages']}" for r in rs})
        lines.append(f"| {kernel} | {dtype} | {arch} | {len(rs)} | {span([r['registers'] for r in rs])} | "
                     f"{span([r['shared_bytes'] / 1024 for r in rs], '{:.0f}')} | "
                     f"{max(r['spill_bytes'] for r in rs)} | {', '.join(configs)} |")
    return "\n".join(lines)


def _ptxas_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton's nvidia backend is missing: {e}"
    for cap in ARCHS:
        try:
            path = get_ptxas(cap).path
        except Exception as e:  # noqa: BLE001 - the knob raises when the binary is absent
            return f"no ptxas for sm_{cap}: {e}"
        if not path or not os.path.exists(path):
            return f"no ptxas for sm_{cap} at {path}"
    return None


@pytest.mark.slow
def test_every_launch_signature_compiles_for_sm80_and_sm90_without_spills():
    missing = _ptxas_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(proc.stdout)
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_gather_dot_kernel", "_tile_kernel", "_dense_block_kernel", "_scatter_kernel"}
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}
    for r in records:
        assert r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= SMEM_LIMIT[int(r["arch"][3:])], r


def main(argv: list[str]) -> None:
    records = compile_all()
    if "--json" in argv:
        print(json.dumps(records))
    else:
        print(summary_table(records))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter breaks compiling (see the docstring)")
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
