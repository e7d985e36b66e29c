"""Hostile adapter files: thousands of mutated shira_fx files and PEFT SHiRA folders. Each one
either loads as a valid adapter or raises ShiraAdapterError; never another exception, never a
changed base weight (after a refused load, and after activate + deactivate of an accepted
one), and never an unpickling."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import shira_fx
from shira_fx import ShiraAdapterError
from tests import tiny_models

FUZZ = settings(max_examples=800, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model (at its base), a valid adapter file's bytes and a valid PEFT folder's files."""
    folder = tmp_path_factory.mktemp("fuzz")
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(r=2, seed=3), progress=False)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.normal_(generator=torch.Generator().manual_seed(0))
    adapter.save(folder / "valid.safetensors")
    adapter.to_peft(folder / "peft")
    adapter.remove()
    files = {
        "shira": (folder / "valid.safetensors").read_bytes(),
        "peft_config": (folder / "peft" / "adapter_config.json").read_bytes(),
        "peft_weights": (folder / "peft" / "adapter_model.safetensors").read_bytes(),
    }
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return model, base, files, folder


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an adapter file was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _check_load(model, base, path) -> bool:
    """Load `path` into a fresh bank: True if accepted (then activated and deactivated),
    False if refused with ShiraAdapterError. Anything else fails the test."""
    bank = shira_fx.AdapterBank(model)
    try:
        bank.load("x", path)
    except ShiraAdapterError:
        accepted = False
    else:
        accepted = True
        bank.activate("x")
        bank.deactivate()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), f"{k} changed by loading {path}"
    return accepted


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# -- byte-level mutations of the safetensors file ------------------------------------------
byte_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(edits=byte_edits, in_header=st.booleans())
def test_flipped_bytes(setup, edits, in_header):
    model, base, files, folder = setup
    data = bytearray(files["shira"])
    n = struct.unpack("<Q", data[:8])[0]
    span = n + 8 if in_header else len(data)
    for pos, value in edits:
        data[pos % span] = value
    path = folder / "flipped.safetensors"
    path.write_bytes(bytes(data))
    _check_load(model, base, path)


@FUZZ
@given(cut=st.integers(0, 10**6), extra=st.binary(max_size=64), length=st.one_of(
    st.none(), st.integers(0, 2**64 - 1), st.integers(0, 4096)))
def test_truncated_extended_and_bad_header_length(setup, cut, extra, length):
    model, base, files, folder = setup
    data = files["shira"]
    data = data[: cut % (len(data) + 1)] + extra
    if length is not None and len(data) >= 8:
        data = struct.pack("<Q", length) + data[8:]
    path = folder / "cut.safetensors"
    path.write_bytes(data)
    _check_load(model, base, path)


# -- structured mutations: header entries, metadata JSON, tensor contents ------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@FUZZ
@given(data=st.data())
def test_mutated_header_and_metadata(setup, data):
    model, base, files, folder = setup
    header, body = _split(files["shira"])
    meta = header["__metadata__"]
    target = data.draw(st.sampled_from(["dtype", "offsets", "shape", "drop", "format", "version",
                                        "config", "layers", "layer_field"]))
    tensors = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(tensors))
    if target == "dtype":
        header[key]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I8", "U8", "I64",
                                                          "BOOL", "F8_E4M3", "XYZ"]))
    elif target == "offsets":
        header[key]["data_offsets"] = data.draw(st.lists(st.integers(-5, 2**40), min_size=0, max_size=3))
    elif target == "shape":
        header[key]["shape"] = data.draw(st.lists(st.integers(-2, 2**33), max_size=3))
    elif target == "drop":
        del header[key]
    elif target == "format":
        meta["format"] = data.draw(st.text(max_size=10))
    elif target == "version":
        meta["format_version"] = data.draw(st.text(max_size=5))
    elif target == "config":
        cfg = json.loads(meta["config"])
        cfg[data.draw(st.sampled_from(sorted(cfg)))] = data.draw(json_values)
        meta["config"] = data.draw(st.sampled_from([json.dumps(cfg), meta["config"][:-3], "{"]))
    elif target == "layers":
        meta["layers"] = data.draw(st.sampled_from(["[]", "{}", "null", meta["layers"][:20]]))
    else:
        layers = json.loads(meta["layers"])
        name = data.draw(st.sampled_from(sorted(layers)))
        field = data.draw(st.sampled_from(["shape", "dtype", "transposed", "nnz", "fingerprint", "?"]))
        layers[name][field] = data.draw(json_values)
        meta["layers"] = json.dumps(layers)
    path = folder / "header.safetensors"
    try:
        path.write_bytes(_join(header, body))
    except (TypeError, ValueError, OverflowError):  # a value JSON cannot write (NaN is fine)
        return
    _check_load(model, base, path)


@FUZZ
@given(data=st.data())
def test_mutated_indices_and_values(setup, data):
    model, base, files, folder = setup
    tensors = st_load(files["shira"])
    header, _ = _split(files["shira"])
    key = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[key].clone()
    kind = data.draw(st.sampled_from(["set", "swap", "dup", "dtype", "reshape", "drop_one"]))
    if kind == "set":
        pos = data.draw(st.integers(0, t.numel() - 1))
        value = data.draw(st.sampled_from([-1, -2**31, 2**31 - 1, 10**6, 0, float("nan"),
                                           float("inf"), 1e30]))
        if t.dtype.is_floating_point:
            t[pos] = value
        else:
            t[pos] = int(value) if value == value and abs(value) < 2**31 else -1
    elif kind == "swap" and t.numel() > 1:
        t[[0, 1]] = t[[1, 0]]
    elif kind == "dup" and t.numel() > 1:
        t[1] = t[0]
    elif kind == "dtype":
        t = t.to(data.draw(st.sampled_from([torch.float16, torch.int64, torch.int16, torch.float64,
                                            torch.uint8])))
    elif kind == "reshape" and t.numel() % 2 == 0:
        t = t.view(2, -1)
    elif kind == "drop_one":
        t = t[1:]
    tensors[key] = t
    path = folder / "tensors.safetensors"
    path.write_bytes(st_save(tensors, metadata=header["__metadata__"]))
    _check_load(model, base, path)


# -- PEFT SHiRA folders --------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_mutated_peft_folders(setup, data):
    model, base, files, folder = setup
    peft = folder / "peft_fuzz"
    peft.mkdir(exist_ok=True)
    config = json.loads(files["peft_config"])
    weights = files["peft_weights"]
    kind = data.draw(st.sampled_from(["config", "config_bytes", "weights_bytes", "tensor"]))
    if kind == "config":
        config[data.draw(st.sampled_from(sorted(config)))] = data.draw(json_values)
    config_bytes = json.dumps(config).encode()
    if kind == "config_bytes":
        config_bytes = config_bytes[: data.draw(st.integers(0, len(config_bytes)))]
    if kind == "weights_bytes":
        raw = bytearray(weights)
        for pos, value in data.draw(byte_edits):
            raw[pos % len(raw)] = value
        weights = bytes(raw)
    if kind == "tensor":
        tensors = st_load(weights)
        key = data.draw(st.sampled_from(sorted(tensors)))
        t = tensors[key].clone()
        flat = t.view(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(
            st.sampled_from([-1, 10**6, float("nan")] if t.dtype.is_floating_point else [-1, 10**6, 0]))
        tensors[key] = t
        weights = st_save(tensors)
    (peft / "adapter_config.json").write_bytes(config_bytes)
    (peft / "adapter_model.safetensors").write_bytes(weights)
    _check_load(model, base, peft)


def test_the_unmutated_files_load(setup):
    """The fuzzers start from files that do load: acceptance is possible, not just refusal."""
    model, base, files, folder = setup
    path = folder / "plain.safetensors"
    path.write_bytes(files["shira"])
    assert _check_load(model, base, path)
    peft = folder / "peft"
    assert _check_load(model, base, peft)
