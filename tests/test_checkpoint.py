"""Checkpoint and resume: stopping mid-training and resuming from a checkpoint gives the same
values and fused weights bit-for-bit as an uninterrupted run; a checkpoint of another adapter
or optimizer, or a corrupt one, is refused with everything unchanged; a save killed mid-write
leaves the previous file intact."""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import shira_fx
from shira_fx import ShiraAdapterError
from shira_fx.checkpoint import checkpoint_extra, load_checkpoint, save_checkpoint
from tests import tiny_models
from tests.conftest import budget

BATCHES = [tiny_models.batch("llama", seed=i) for i in range(10)]


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(owner, name, refuse)


def _fresh(seed: int = 0, targets: list[str] | None = None):
    """Model, adapter, AdamW and a warm-up + cosine schedule, built the same way every time."""
    model = tiny_models.build("llama")
    cfg = shira_fx.ShiraConfig(density=0.1, seed=seed, target_modules=targets)
    adapter = shira_fx.prepare(model, cfg, progress=False)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[3])
    step = shira_fx.train_step(adapter, opt, scheduler=sched)(lambda b: model(**b).loss)
    return model, adapter, opt, sched, step


def _snapshot(model, adapter, opt, sched) -> dict:
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "values": {k: v.clone() for k, v in adapter.state_dict().items()},
            "opt": copy.deepcopy(opt.state_dict()),
            "sched": None if sched is None else copy.deepcopy(sched.state_dict())}


def _assert_same(a: dict, b: dict) -> None:
    for part in ("weights", "values"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part} {k}"
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for pid, entries in a["opt"]["state"].items():
        for key, value in entries.items():
            other = b["opt"]["state"][pid][key]
            if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
                assert torch.equal(value, other), f"optimizer {pid}.{key}"
            else:  # an accepted checkpoint may hold a plain number (e.g. the step)
                assert type(value) is type(other) and value == other, f"optimizer {pid}.{key}"
    assert a["sched"] == b["sched"]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    n, k = len(BATCHES), 4
    model, adapter, opt, sched, step = _fresh()
    for b in BATCHES:
        step(b)
    expected = _snapshot(model, adapter, opt, sched)

    model, adapter, opt, sched, step = _fresh()
    for b in BATCHES[:k]:
        step(b)
    save_checkpoint(tmp_path / "ckpt.safetensors", adapter, opt, k, sched, extra={"epoch": 0, "batch": k})
    del model, adapter, opt, sched, step

    model, adapter, opt, sched, step = _fresh()  # a new process would start exactly like this
    assert load_checkpoint(tmp_path / "ckpt.safetensors", adapter, opt, sched) == k
    assert checkpoint_extra(tmp_path / "ckpt.safetensors") == {"epoch": 0, "batch": k}
    for b in BATCHES[k:n]:
        step(b)
    _assert_same(_snapshot(model, adapter, opt, sched), expected)  # fp32, bit-for-bit


def test_bad_checkpoints_are_refused_and_change_nothing(tmp_path):
    _, adapter, opt, sched, step = _fresh()
    step(BATCHES[0])
    ok = tmp_path / "ok.safetensors"
    save_checkpoint(ok, adapter, opt, 1, sched)

    model, other, other_opt, other_sched, other_step = _fresh(seed=1)  # same layers, another mask
    other_step(BATCHES[1])
    before = _snapshot(model, other, other_opt, other_sched)
    with pytest.raises(ShiraAdapterError, match="indices differ"):
        load_checkpoint(ok, other, other_opt, other_sched)
    _assert_same(_snapshot(model, other, other_opt, other_sched), before)

    model, same, same_opt, same_sched, same_step = _fresh()  # the right adapter, wrong companions
    same_step(BATCHES[1])
    before = _snapshot(model, same, same_opt, same_sched)
    with pytest.raises(ShiraAdapterError, match="has scheduler state but the caller passes none"):
        load_checkpoint(ok, same, same_opt, None)
    with pytest.raises(ShiraAdapterError, match="AdamW"):
        load_checkpoint(ok, same, torch.optim.SGD(same.parameters(), lr=0.1), same_sched)
    step_lr = torch.optim.lr_scheduler.StepLR(torch.optim.AdamW(same.parameters()), step_size=2)
    with pytest.raises(ShiraAdapterError, match="SequentialLR"):
        load_checkpoint(ok, same, same_opt, step_lr)
    reordered = torch.optim.AdamW(list(same.parameters())[::-1], lr=1e-2, weight_decay=0.01)
    with pytest.raises(ShiraAdapterError, match="parameters differ"):
        load_checkpoint(ok, same, reordered)
    with pytest.raises(ShiraAdapterError, match="parameters differ"):
        load_checkpoint(ok, same, torch.optim.AdamW(list(same.parameters())[1:], lr=1e-2))
    data = ok.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShiraAdapterError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.safetensors", same, same_opt, same_sched)
    adapter.save(tmp_path / "adapter.safetensors")
    with pytest.raises(ShiraAdapterError, match="not a shira_fx checkpoint"):
        load_checkpoint(tmp_path / "adapter.safetensors", same, same_opt, same_sched)
    for missing in (tmp_path / "nothing.safetensors", tmp_path):
        with pytest.raises(ShiraAdapterError, match="no such checkpoint"):
            load_checkpoint(missing, same, same_opt, same_sched)
    _assert_same(_snapshot(model, same, same_opt, same_sched), before)

    # other layers: the error names them
    model, fewer, fewer_opt, fewer_sched, fewer_step = _fresh(targets=["q_proj", "v_proj"])
    fewer_step(BATCHES[2])
    before = _snapshot(model, fewer, fewer_opt, fewer_sched)
    with pytest.raises(ShiraAdapterError, match=r"another adapter: layers missing \[\], unexpected"):
        load_checkpoint(ok, fewer, fewer_opt, fewer_sched)
    _assert_same(_snapshot(model, fewer, fewer_opt, fewer_sched), before)


def test_a_failure_while_applying_is_rolled_back(tmp_path, monkeypatch):
    """Even what the checks cannot foresee (here: the scheduler refuses its state) leaves the
    adapter, optimizer and scheduler as they were."""
    _, adapter, opt, sched, step = _fresh()
    step(BATCHES[0])
    save_checkpoint(tmp_path / "ok.safetensors", adapter, opt, 1, sched)
    model, other, other_opt, other_sched, other_step = _fresh()
    for b in BATCHES[3:6]:
        other_step(b)
    before = _snapshot(model, other, other_opt, other_sched)
    real = type(other_sched).load_state_dict

    def refuse(self, state):
        if state is not before["sched"] and state != before["sched"]:
            raise RuntimeError("scheduler says no")
        return real(self, state)

    monkeypatch.setattr(type(other_sched), "load_state_dict", refuse)
    with pytest.raises(ShiraAdapterError, match="scheduler says no.*nothing was changed"):
        load_checkpoint(tmp_path / "ok.safetensors", other, other_opt, other_sched)
    _assert_same(_snapshot(model, other, other_opt, other_sched), before)


# -- hostile checkpoints: each loads or raises ShiraAdapterError, never changing anything ------
@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt_fuzz")
    _, adapter, opt, sched, step = _fresh()
    for b in BATCHES[:2]:
        step(b)
    save_checkpoint(folder / "valid.safetensors", adapter, opt, 2, sched, extra={"epoch": 1})
    target = _fresh()
    target[4](BATCHES[5])
    return folder, (folder / "valid.safetensors").read_bytes(), target


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


def _mutate(data: bytes, draw) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    kind = draw(st.sampled_from(["bytes", "cut", "meta_value", "meta_json", "meta_drop", "group",
                                 "scalar", "tensor"]))
    if kind == "bytes":
        raw = bytearray(data)
        for pos, value in draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                        min_size=1, max_size=6)):
            raw[pos % len(raw)] = value
        return bytes(raw)
    if kind == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind in ("meta_value", "meta_json", "meta_drop"):
        key = draw(st.sampled_from(sorted(meta)))
        if kind == "meta_drop":
            del meta[key]
        elif kind == "meta_json":
            meta[key] = json.dumps(draw(json_values))
        else:
            meta[key] = draw(st.sampled_from(["", "{", "[" * 50_000, "1" * 5000, "-1", "2", "null",
                                              "true", "1e999", "NaN", "[]", "{}"]))
    elif kind in ("group", "scalar"):
        opt = json.loads(meta["optimizer"])
        if kind == "group":
            group = opt["param_groups"][0]
            group[draw(st.sampled_from(sorted(group) + ["new"]))] = draw(json_values)
        else:
            opt["scalars"][draw(st.sampled_from(["0.step", "x.y", "99.step", "0", "1.extra"]))] = \
                draw(json_values)
        meta["optimizer"] = json.dumps(opt)
    else:
        tensors = st_load(data)
        key = draw(st.sampled_from(sorted(tensors)))
        t = tensors[key].clone()
        how = draw(st.sampled_from(["nan", "scalar", "reshape", "int", "drop", "rename", "set"]))
        if how == "nan" and t.is_floating_point() and t.numel():
            t.view(-1)[0] = float("nan")
        elif how == "scalar":
            t = t.reshape(-1)[:1].reshape(())
        elif how == "reshape" and t.numel() > 1:
            t = t.reshape(-1)[1:]
        elif how == "int":
            t = t.to(torch.int32)
        elif how == "set" and t.numel():
            t.view(-1)[0] = draw(st.sampled_from([-1, 0, 10**6, 1e30]))
        if how == "drop":
            del tensors[key]
        elif how == "rename":
            del tensors[key]
            tensors[draw(st.sampled_from(["optimizer.x.exp_avg", "optimizer.1000.exp_avg", "stray",
                                          "adapter.model.other.values", "optimizer.0"]))] = t
        else:
            tensors[key] = t
        return st_save(tensors, metadata=meta)
    raw_header = json.dumps(header).encode()
    return struct.pack("<Q", len(raw_header)) + raw_header + data[8 + n:]


@pytest.mark.fuzz
@settings(max_examples=budget(400), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_checkpoints_load_or_change_nothing(resumable, data):
    folder, valid, (model, adapter, opt, sched, _) = resumable
    path = folder / "mutated.safetensors"
    path.write_bytes(_mutate(valid, data.draw))
    before = _snapshot(model, adapter, opt, sched)
    try:
        load_checkpoint(path, adapter, opt, sched)
    except ShiraAdapterError as exc:
        assert str(path) in str(exc)
        _assert_same(_snapshot(model, adapter, opt, sched), before)
    else:  # accepted: the fused weights hold base + values, all finite
        for layer in adapter.layers.values():
            assert torch.isfinite(layer.values).all()
            fused = layer.weight.view(-1)[layer.indices.long()]
            assert torch.equal(fused, (layer.base.float() + layer.values.detach()).to(fused.dtype))


# -- a save killed mid-write ---------------------------------------------------------------
CHILD = textwrap.dedent("""
    import shutil, sys, time
    import torch, shira_fx
    import shira_fx.atomic as files
    from safetensors.torch import save as st_save
    from shira_fx.checkpoint import save_checkpoint
    from tests import tiny_models

    path, kind = sys.argv[1], sys.argv[2]
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.5), progress=False)
    opt = torch.optim.AdamW(adapter.parameters())

    def save(value):
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.values.fill_(value)
        if kind == "adapter":
            adapter.save(path)
        else:
            save_checkpoint(path, adapter, opt, int(value))

    save(1.0)                                    # the first, complete file
    shutil.copyfile(path, path + ".first")

    def slow_save(tensors, filename, metadata=None):
        data = st_save(tensors, metadata=metadata)
        with open(filename, "wb") as f:          # 512 bytes a second; the parent kills us
            for start in range(0, len(data), 512):
                f.write(data[start:start + 512])
                f.flush()
                if start == 0:
                    print("writing", len(data), flush=True)
                time.sleep(1.0)

    files.save_file = slow_save
    save(2.0)                                    # killed in the middle of this one
    print("finished", flush=True)
""")


@pytest.mark.parametrize("kind", ["adapter", "checkpoint"])
def test_a_save_killed_midway_leaves_the_previous_file(tmp_path, kind):
    path = tmp_path / "target.safetensors"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), kind], cwd=root,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = child.stdout.readline().split()
        assert line[:1] == ["writing"], "the child never reached the second save"
        child.kill()  # SIGKILL: no handler, no cleanup runs
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -9
    assert path.read_bytes() == (tmp_path / "target.safetensors.first").read_bytes()
    model = tiny_models.build("mlp")
    if kind == "adapter":
        shira_fx.AdapterBank(model).load("first", path)
        stored = shira_fx.load_adapter(path)
        for name, spec in stored.layers.items():
            assert torch.equal(stored.tensors(name, spec.shape)[1], torch.ones(spec.nnz))
    else:
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.5), progress=False)
        assert load_checkpoint(path, adapter, torch.optim.AdamW(adapter.parameters())) == 1
        assert all(torch.equal(la.values, torch.ones_like(la.values)) for la in adapter.layers.values())
    # the killed save's partial temp file stays behind (nothing can clean up after SIGKILL);
    # readers never look at it and the next save of the same target is unaffected
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".shira-")]
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < int(line[1]), leftovers
