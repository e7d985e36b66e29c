"""Checkpoint and resume: stopping mid-training and resuming from a checkpoint gives the same
values bit-for-bit as an uninterrupted run; bad checkpoints change nothing; a save killed
mid-write leaves the previous file intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import shira_fx
from shira_fx import ShiraAdapterError
from shira_fx.checkpoint import load_checkpoint, save_checkpoint
from tests import tiny_models

BATCHES = [tiny_models.batch("llama", seed=i) for i in range(10)]


def _fresh(seed: int = 0):
    model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1, seed=seed), progress=False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    step = shira_fx.train_step(adapter, opt, scheduler=sched)(lambda b: model(**b).loss)
    return model, adapter, opt, sched, step


def test_resume_equals_an_uninterrupted_run(tmp_path):
    model, adapter, _, _, step = _fresh()
    for b in BATCHES:
        step(b)
    expected = {k: v.clone() for k, v in adapter.state_dict().items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    model, adapter, opt, sched, step = _fresh()
    for b in BATCHES[:4]:
        step(b)
    save_checkpoint(tmp_path / "ckpt.safetensors", adapter, opt, 4, sched, extra={"epoch": 0})
    del model, adapter, opt, sched, step

    model, adapter, opt, sched, step = _fresh()
    assert load_checkpoint(tmp_path / "ckpt.safetensors", adapter, opt, sched) == 4
    for b in BATCHES[4:]:
        step(b)
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, expected[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), f"fused weight {k} differs"


def test_bad_checkpoints_are_refused_and_change_nothing(tmp_path):
    _, adapter, opt, sched, step = _fresh()
    step(BATCHES[0])
    save_checkpoint(tmp_path / "ok.safetensors", adapter, opt, 1, sched)

    _, other, other_opt, other_sched, other_step = _fresh(seed=1)  # another mask
    other_step(BATCHES[1])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    opt_before = other_opt.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(ShiraAdapterError, match="indices differ"):
        load_checkpoint(tmp_path / "ok.safetensors", other, other_opt, other_sched)
    with pytest.raises(ShiraAdapterError, match="scheduler"):
        load_checkpoint(tmp_path / "ok.safetensors", other, other_opt, None)
    sgd = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ShiraAdapterError, match="AdamW"):
        load_checkpoint(tmp_path / "ok.safetensors", other, sgd)
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShiraAdapterError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.safetensors", other, other_opt, other_sched)
    adapter.save(tmp_path / "adapter.safetensors")
    with pytest.raises(ShiraAdapterError, match="not a shira_fx checkpoint"):
        load_checkpoint(tmp_path / "adapter.safetensors", other, other_opt, other_sched)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt_before)


CHILD = textwrap.dedent("""
    import sys, time
    import torch, shira_fx
    import shira_fx.adapter_files as files
    from tests import tiny_models

    path = sys.argv[1]
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.5), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.fill_(1.0)
    adapter.save(path)                      # the first, complete file

    real = files.save_file
    def slow_save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:    # leave the temp file half written, then stall
            f.truncate(f.seek(0, 2) // 2)
        print("writing", flush=True)
        time.sleep(60)
    files.save_file = slow_save
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.fill_(2.0)
    adapter.save(path)                      # killed in the middle of this one
""")


def test_a_save_killed_midway_leaves_the_previous_file(tmp_path):
    path = tmp_path / "adapter.safetensors"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=root,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing", "the child never reached the save"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    stored = shira_fx.load_adapter(path)
    for name, spec in stored.layers.items():
        _, values = stored.tensors(name, spec.shape)
        assert torch.equal(values, torch.ones_like(values)), "the file holds the interrupted save"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".shira-")]
    assert len(leftovers) == 1, leftovers  # the killed save's temp file; the target is intact
