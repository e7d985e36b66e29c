"""Hostile adapter files: mutated shira_fx files (version 1, and version 2 with every index code)
and PEFT SHiRA folders, grown from valid ones. Each either loads as a valid adapter or raises
ShiraAdapterError naming the file (and the layer, where one layer's code or values are
wrong); never another exception, a hang, a write outside the adapter's positions or a changed
base weight (checked bit for bit after a refused load, and after activate + deactivate of an
accepted one); nothing is ever unpickled. An accepted shira_fx file always holds exactly the
positions it was written with (checksums and fingerprints cover them). Where a mutation's
outcome is certain (an index out of range, a NaN, a finite new value, another valid code of
the same positions) the test also says which outcome it must be."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import signal
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import shira_fx
from shira_fx import ShiraAdapterError, index_codes
from shira_fx.adapter_files import COLUMNS
from shira_fx.index_codes import CODES, IndexCode, checksum, decode, encode
from tests import file_kit, tiny_models
from tests.conftest import budget

pytestmark = pytest.mark.fuzz


def fuzz(n: int):
    return settings(max_examples=budget(n), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


CASE_TIMEOUT_S = 20  # one load takes milliseconds; a case this slow is a hang


def _random_values(adapter) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.1)


def _every_code(data: bytes, seed: int) -> bytes:
    """A version 2 file whose layers take the index codes in turn (int32, gaps, struct, ...)."""
    f = file_kit.V2(data)
    for row, name in enumerate(f.table["name"]):
        shape, transposed = tuple(f.table["shape"][row]), f.table["transposed"][row]
        idx = decode(f.code(row), f.codes[row], f.table["nnz"][row], shape, transposed, name, seed)
        f.set_code(row, *encode(idx, shape, transposed, name, kinds=(("int32", "gaps", "struct")[row % 3],)))
    return f.bytes()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per model kind: the model at its base, a bit copy of its state, the valid files (v1 and
    v2 of a rand adapter, v2 of a wm adapter coded with every code) and each file's positions."""
    folder = tmp_path_factory.mktemp("fuzz")
    out = {}
    for kind, cfg in (("mlp", shira_fx.ShiraConfig(r=2, seed=3)),      # nn.Linear, PEFT-compatible
                      ("gpt2", shira_fx.ShiraConfig(density=0.02, seed=1))):  # Conv1D (transposed)
        model = tiny_models.build(kind)
        adapter = shira_fx.prepare(model, cfg, progress=False)
        _random_values(adapter)
        adapter.save(folder / f"{kind}.safetensors")
        files = {"v1": file_kit.v1_bytes(adapter), "v2": (folder / f"{kind}.safetensors").read_bytes()}
        rand = {name: layer.indices.long().clone() for name, layer in adapter.layers.items()}
        positions = {"v1": rand, "v2": rand}
        if kind == "mlp":
            adapter.to_peft(folder / "peft")
            files["peft_config"] = (folder / "peft" / "adapter_config.json").read_bytes()
            files["peft_weights"] = (folder / "peft" / "adapter_model.safetensors").read_bytes()
        adapter.remove()
        wm = shira_fx.prepare(model, dataclasses.replace(cfg, mask="wm"), progress=False)
        _random_values(wm)
        wm.save(folder / f"{kind}.wm.safetensors")
        files["v2_codes"] = _every_code((folder / f"{kind}.wm.safetensors").read_bytes(), cfg.seed)
        positions["v2_codes"] = {name: layer.indices.long().clone() for name, layer in wm.layers.items()}
        wm.remove()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        out[kind] = (model, base, files, positions)
    return out, folder


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an adapter file was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


@contextlib.contextmanager
def watchdog(seconds: float):
    def hang(signum, frame):
        raise AssertionError(f"a load took longer than {seconds} s (a hang?)")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().flatten().view(torch.uint8)


def _assert_state(model, expected: dict, why: str) -> None:
    for k, v in model.state_dict().items():
        assert v.dtype == expected[k].dtype and torch.equal(_bits(v), _bits(expected[k])), \
            f"{k} changed ({why})"


def _check_load(model, base, path, positions: dict | None = None, layer: str | None = None) -> dict | None:
    """Load `path` (the stored reader alone, then into a fresh bank). Returns the bank's slots
    if accepted, after checking they are valid, that they hold exactly `positions` (when
    given), that activate writes exactly base + delta at them and deactivate restores the
    base; None if refused with ShiraAdapterError naming the file (and `layer`, when given).
    Anything else fails the test."""
    modules = dict(model.named_modules())
    with watchdog(CASE_TIMEOUT_S):
        try:  # the reader on its own, with the shapes the file claims (no model to check them)
            stored = shira_fx.load_adapter(path)
            for name, spec in stored.layers.items():
                shape = spec.shape or (tuple(modules[name].weight.shape) if name in modules else (3, 5))
                stored.tensors(name, shape)
        except ShiraAdapterError as e:
            assert str(path) in str(e), f"the error does not name the file: {e}"
        bank = shira_fx.AdapterBank(model)
        try:
            bank.load("x", path)
        except ShiraAdapterError as e:
            assert str(path) in str(e), f"the error does not name the file: {e}"
            assert layer is None or repr(layer) in str(e), f"the error does not name layer {layer!r}: {e}"
            _assert_state(model, base, f"by a refused load of {path}")
            return None
        slots = bank._adapters["x"]
        for name, slot in slots.items():
            if positions is not None:
                assert torch.equal(slot.indices.cpu(), positions[name]), f"{name}: other positions accepted"
        expected = {k: v.clone() for k, v in base.items()}
        for name, slot in slots.items():
            w = expected[f"{name}.weight"].view(-1)
            idx = slot.indices
            assert idx.dtype == torch.int64 and idx.dim() == 1 and idx.numel() == slot.delta.numel()
            assert int(idx.min()) >= 0 and int(idx.max()) < w.numel()
            assert bool((idx[1:] > idx[:-1]).all()) and bool(torch.isfinite(slot.delta).all())
            w[idx] = (w[idx].float() + slot.delta).to(w.dtype)
        bank.activate("x")
        _assert_state(model, expected, f"activate wrote outside base + delta ({path})")
        bank.deactivate()
        _assert_state(model, base, f"by activate + deactivate of {path}")
        return slots


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _write(folder, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


kinds = st.sampled_from(["mlp", "gpt2"])
shira_files = st.sampled_from(["v1", "v2", "v2_codes"])
byte_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
deep_json = st.integers(900, 50_000).map(lambda d: "[" * d + "]" * d)
broken_json = st.sampled_from(["", "{", "[1,", "nul", '{"a": }', "\udcff", "{\"a\": 1}}", "NaN"])


# -- bytes: flipped bytes, truncation, extension, the 8-byte header length -------------------
@fuzz(600)
@given(kind=kinds, label=shira_files, edits=byte_edits, in_header=st.booleans())
def test_flipped_bytes(setup, kind, label, edits, in_header):
    models, folder = setup
    model, base, files, positions = models[kind]
    data = bytearray(files[label])
    n = struct.unpack("<Q", data[:8])[0]
    span = n + 8 if in_header else len(data)
    for pos, value in edits:
        data[pos % span] = value
    _check_load(model, base, _write(folder, "flipped.safetensors", bytes(data)), positions[label])


@fuzz(500)
@given(kind=kinds, label=shira_files, cut=st.integers(0, 10**6), extra=st.binary(max_size=64),
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1), st.integers(0, 4096),
                        st.integers(-16, 16).map(lambda d: ("rel", d))))
def test_truncated_extended_and_bad_header_length(setup, kind, label, cut, extra, length):
    models, folder = setup
    model, base, files, positions = models[kind]
    data = files[label]
    real = struct.unpack("<Q", data[:8])[0]
    data = data[: cut % (len(data) + 1)] + extra
    if length is not None and len(data) >= 8:
        n = real + length[1] if isinstance(length, tuple) else length
        data = struct.pack("<Q", max(n, 0)) + data[8:]
    _check_load(model, base, _write(folder, "cut.safetensors", data), positions[label])


# -- the safetensors header's tensor entries -------------------------------------------------
@fuzz(600)
@given(kind=kinds, label=shira_files, data=st.data())
def test_mutated_header_entries(setup, kind, label, data):
    models, folder = setup
    model, base, files, positions = models[kind]
    header, body = _split(files[label])
    tensors = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(tensors))
    entry = header[key]
    begin, end = entry["data_offsets"]
    what = data.draw(st.sampled_from(["dtype", "offsets", "shape", "drop", "rename", "add", "alias"]))
    if what == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "U8", "I32",
                                                    "I64", "U64", "BOOL", "F8_E4M3", "C64", "XYZ", 7]))
    elif what == "offsets":
        entry["data_offsets"] = data.draw(st.one_of(
            st.lists(st.integers(-5, 2**64 + 5), max_size=3),
            st.integers(-64, 64).map(lambda d: [begin + d, end + d]),
            st.integers(-64, 64).map(lambda d: [begin, end + d]),
            st.just([end, begin]), st.just([0, len(body)]), st.just(None), st.just("0,4")))
    elif what == "shape":
        n = entry["shape"][0]
        entry["shape"] = data.draw(st.one_of(
            st.lists(st.integers(-2, 2**64), max_size=3),
            st.sampled_from([[n + 1], [n - 1], [0], [], [n, 1], [1, n], [2, n // 2], [-n]])))
    elif what == "drop":
        del header[key]
    elif what == "rename":
        header[key + data.draw(st.sampled_from(["x", "", ".0", " "])) + "_"] = header.pop(key)
    elif what == "add":
        header[data.draw(st.sampled_from(["extra", "0.bias", key + "2"]))] = dict(entry)
    else:  # two entries over the same bytes
        other = data.draw(st.sampled_from(tensors))
        entry.update({k: header[other][k] for k in ("data_offsets", "dtype", "shape")})
    try:
        raw = _join(header, body)
    except (TypeError, ValueError):
        return
    _check_load(model, base, _write(folder, "entries.safetensors", raw), positions[label])


# -- version 1 metadata: format, version, config and layers JSON -----------------------------
@fuzz(800)
@given(kind=kinds, data=st.data())
def test_mutated_v1_metadata(setup, kind, data):
    models, folder = setup
    model, base, files, positions = models[kind]
    header, body = _split(files["v1"])
    meta = header["__metadata__"]
    what = data.draw(st.sampled_from(["format", "version", "drop_key", "add_key", "config",
                                      "config_text", "layers_text", "layer_field", "drop_field",
                                      "layer_name", "drop_layer", "fingerprint", "shape"]))
    layers = json.loads(meta["layers"])
    name = data.draw(st.sampled_from(sorted(layers)))
    if what == "format":
        meta["format"] = data.draw(st.sampled_from(["", "shira", "pt", "SHIRA_FX", "shira_fx "]))
    elif what == "version":
        meta["format_version"] = data.draw(st.sampled_from(["0", "2", "3", "1.0", " 1", "01", "", "999"]))
    elif what == "drop_key":
        del meta[data.draw(st.sampled_from(sorted(meta)))]
    elif what == "add_key":
        meta[data.draw(st.text(max_size=6))] = data.draw(st.one_of(st.text(max_size=6), st.just(5)))
    elif what == "config":
        cfg = json.loads(meta["config"])
        field = data.draw(st.sampled_from(sorted(cfg) + ["unknown"]))
        cfg[field] = data.draw(st.one_of(json_values, st.sampled_from(
            ["a{4294967296}", "(" * 5000 + ")" * 5000, "[", "(?P<", ".*", "x" * 1000])))
        if data.draw(st.booleans()):
            del cfg[data.draw(st.sampled_from(sorted(cfg)))]
        meta["config"] = json.dumps(cfg)
    elif what == "config_text":
        meta["config"] = data.draw(st.one_of(broken_json, deep_json, st.sampled_from(
            ["[]", "null", "1e999", "[" + "1," * 1000 + "1]", '"x"'])))
    elif what == "layers_text":
        meta["layers"] = data.draw(st.one_of(broken_json, deep_json, st.sampled_from(
            ["[]", "{}", "null", "1", '{"0": null}', meta["layers"][:20]])))
    elif what == "layer_field":
        field = data.draw(st.sampled_from(["shape", "dtype", "transposed", "nnz", "fingerprint", "?"]))
        layers[name][field] = data.draw(st.one_of(json_values, st.sampled_from(
            [float("inf"), float("nan"), -1, 0, 2**64, 10**400, "3", True, [1e999, 2]])))
    elif what == "drop_field":
        del layers[name][data.draw(st.sampled_from(sorted(layers[name])))]
    elif what == "layer_name":
        layers[data.draw(st.sampled_from(["", ".", "0.", "model", "wte", "transformer.wte",
                                          "lm_head", "x" * 300, name + ".", "1"]))] = layers.pop(name)
    elif what == "drop_layer":
        del layers[name]
    elif what == "fingerprint":
        fp = layers[name]["fingerprint"]
        pos = data.draw(st.integers(0, 63))
        layers[name]["fingerprint"] = data.draw(st.sampled_from(
            [fp[:pos] + ("0" if fp[pos] != "0" else "1") + fp[pos + 1:], fp.upper() + "0", fp[:-1]]))
    else:
        s = layers[name]["shape"]
        layers[name]["shape"] = data.draw(st.sampled_from(
            [s[::-1] if s[0] != s[1] else [s[0], s[1] + 1], [s[0] + 1, s[1]], [s[0], s[1] - 1],
             [1, s[0] * s[1]], [2**62, 2**62], s + [1]]))
        if data.draw(st.booleans()):
            layers[name]["transposed"] = not layers[name]["transposed"]
        if data.draw(st.booleans()):
            layers[name]["dtype"] = data.draw(st.sampled_from(["float16", "bfloat16", "float64", "int8"]))
    if what in ("layer_field", "drop_field", "layer_name", "drop_layer", "fingerprint", "shape"):
        meta["layers"] = json.dumps(layers)
    try:
        raw = _join(header, body)
    except (TypeError, ValueError, UnicodeEncodeError):  # a value JSON cannot write
        return
    path = _write(folder, "meta.safetensors", raw)
    accepted = _check_load(model, base, path, positions["v1"]) is not None
    if what in ("version", "drop_layer", "fingerprint", "shape", "config_text", "layers_text"):
        assert not accepted, f"{what} mutation was accepted"


# -- version 1 tensors: index and value contents, dtypes, lengths (a consistent file) --------
@fuzz(800)
@given(kind=kinds, data=st.data())
def test_mutated_v1_indices_and_values(setup, kind, data):
    models, folder = setup
    model, base, files, _ = models[kind]
    tensors = st_load(files["v1"])
    header, _ = _split(files["v1"])
    meta = header["__metadata__"]
    name = data.draw(st.sampled_from(sorted({k.rsplit(".", 1)[0] for k in tensors})))
    idx, vals = tensors[f"{name}.indices"].clone(), tensors[f"{name}.values"].clone()
    what = data.draw(st.sampled_from(["index", "swap", "dup", "shift", "reverse", "value",
                                      "idx_dtype", "val_dtype", "shape", "shorter", "longer"]))
    numel = model.get_submodule(name).weight.numel()
    if what == "index":
        pos = data.draw(st.integers(0, idx.numel() - 1))
        idx[pos] = data.draw(st.sampled_from([-1, -2**31, 2**31 - 1, numel, numel - 1, 0, 10**6]))
    elif what == "swap":
        pos = data.draw(st.integers(0, idx.numel() - 2))
        idx[[pos, pos + 1]] = idx[[pos + 1, pos]]
    elif what == "dup":
        pos = data.draw(st.integers(0, idx.numel() - 2))
        idx[pos + 1] = idx[pos]
    elif what == "shift":
        idx = idx + data.draw(st.sampled_from([1, -1, numel]))
    elif what == "reverse":
        idx = idx.flip(0)
    elif what == "value":
        pos = data.draw(st.integers(0, vals.numel() - 1))
        vals[pos] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -0.0,
                                               1e-45, 3.0e38, 0.0]))
    elif what == "idx_dtype":
        idx = idx.to(data.draw(st.sampled_from([torch.int64, torch.int16, torch.float32, torch.uint8])))
    elif what == "val_dtype":
        vals = vals.to(data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16,
                                                  torch.int32])))
        if vals.dtype == torch.float64 and data.draw(st.booleans()):
            vals[0] = 1e300  # finite in the file, Inf in the fp32 the bank computes with
    elif what == "shape":
        if data.draw(st.booleans()):
            idx = idx[: idx.numel() // 2 * 2].view(2, -1)
        else:
            vals = vals[: vals.numel() // 2 * 2].view(-1, 2)
    elif what == "shorter":
        idx, vals = idx[:-1], vals[:-1]
    else:  # one more position, beyond the last (still sorted and in range when there is room)
        idx = torch.cat([idx, idx[-1:] + 1])
        vals = torch.cat([vals, vals[-1:]])
    if what in ("shorter", "longer") and data.draw(st.booleans()):  # keep the metadata consistent
        layers = json.loads(meta["layers"])
        layers[name]["nnz"] = idx.numel()
        meta["layers"] = json.dumps(layers)
    tensors[f"{name}.indices"], tensors[f"{name}.values"] = idx, vals
    path = _write(folder, "tensors.safetensors", st_save(tensors, metadata=meta))
    slots = _check_load(model, base, path)
    original = st_load(files["v1"])[f"{name}.indices"]
    same_idx = idx.shape == original.shape and idx.dtype in (torch.int32, torch.int64) \
        and torch.equal(idx.long(), original.long())
    if not same_idx or (what == "value" and not bool(torch.isfinite(vals.float()).all())):
        assert slots is None, f"{what} mutation was accepted"  # fingerprint covers the indices
    if what == "value" and bool(torch.isfinite(vals).all()):
        assert slots is not None, "a finite new value was refused"
        assert torch.equal(_bits(slots[name].delta), _bits(vals.float())), "loaded values differ"


# -- version 2: the layer table --------------------------------------------------------------
def _flip_hex(text: str, pos: int) -> str:
    return text[:pos] + ("0" if text[pos] != "0" else "1") + text[pos + 1:]


def _some_int(value, data, path=()):
    """A path to one int inside nested lists (or None)."""
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        return None
    if isinstance(value, int):
        return path
    inner = [i for i, v in enumerate(value) if _some_int(v, data, path + (i,)) is not None]
    if not inner:
        return None
    i = data.draw(st.sampled_from(inner))
    return _some_int(value[i], data, path + (i,))


@fuzz(800)
@given(kind=kinds, label=st.sampled_from(["v2", "v2_codes"]), data=st.data())
def test_mutated_v2_layer_table(setup, kind, label, data):
    models, folder = setup
    model, base, files, positions = models[kind]
    f = file_kit.V2(files[label])
    table, rows = f.table, len(f.table["name"])
    row = data.draw(st.integers(0, rows - 1))
    what = data.draw(st.sampled_from(["version", "drop_column", "add_column", "column", "cell", "name",
                                      "shape", "nnz", "fingerprint", "check", "code", "args", "seed",
                                      "layers_text", "reorder"]))
    must_refuse, text = True, None
    if what == "version":
        f.meta["format_version"] = data.draw(st.sampled_from(["0", "1", "3", "2.0", " 2", "02", "", "999"]))
    elif what == "drop_column":
        del table[data.draw(st.sampled_from(COLUMNS))]
    elif what == "add_column":
        table[data.draw(st.sampled_from(["extra", "Name", ""]))] = [0] * rows
    elif what == "column":
        column = data.draw(st.sampled_from(COLUMNS))
        before = table[column]
        table[column] = data.draw(st.one_of(json_values, st.just(before[:-1]), st.just(before + before[:1])))
        must_refuse = table[column] != before
    elif what == "cell":
        table[data.draw(st.sampled_from(COLUMNS))][row] = data.draw(st.one_of(json_values, st.sampled_from(
            [float("inf"), float("nan"), -1, 0, 2**64, 10**400, "3", True, [1e999, 2], [], [0, 0, 0, 0, 0],
             "rand", "gaps", "struct", "int32", "0" * 16, "0" * 32])))
        must_refuse = False  # a cell may be set to what it was; the positions must hold regardless
    elif what == "name":
        table["name"][row] = data.draw(st.sampled_from(
            ["", ".", "x" * 300, table["name"][row] + ".", table["name"][(row + 1) % rows], 7, None]))
        must_refuse = rows > 1 or table["name"][row] != table["name"][(row + 1) % rows]
    elif what == "shape":
        shape = table["shape"][row]
        table["shape"][row] = data.draw(st.sampled_from(
            [shape[::-1] if shape[0] != shape[1] else [shape[0], shape[1] + 1], [shape[0] + 1, shape[1]],
             [1, shape[0] * shape[1]], [2**62, 2**62], shape + [1], [shape[0], 0]]))
    elif what == "nnz":
        table["nnz"][row] += data.draw(st.sampled_from([1, -1, 10**9]))
    elif what == "fingerprint":
        table["fingerprint"][row] = _flip_hex(table["fingerprint"][row], data.draw(st.integers(0, 31)))
    elif what == "check":
        table["check"][row] = _flip_hex(table["check"][row], data.draw(st.integers(0, 15)))
    elif what == "code":
        others = [c for c in CODES if c != table["code"][row]]
        table["code"][row] = data.draw(st.sampled_from(others + ["zip"]))
    elif what == "args":
        at = _some_int(table["args"][row], data)
        if at is None:
            table["args"][row] = data.draw(st.one_of(json_values, st.just([0])))
            must_refuse = table["args"][row] != []
        else:
            holder = table["args"][row]
            for i in at[:-1]:
                holder = holder[i]
            holder[at[-1]] = holder[at[-1]] + data.draw(st.sampled_from([1, -1, 8, 2**31, -2**40]))
            must_refuse = False  # a different argument may describe the same offsets (a padding bit)
    elif what == "seed":  # rand codes regenerate with the config's seed
        f.meta["config"] = json.dumps({**json.loads(f.meta["config"]), "seed": data.draw(st.integers(0, 99))})
        must_refuse = "rand" in table["code"] and json.loads(f.meta["config"]) != json.loads(
            file_kit.V2(files[label]).meta["config"])
    elif what == "layers_text":
        text = data.draw(st.one_of(broken_json, deep_json, st.sampled_from(
            ["[]", "{}", "null", "1", '{"name": null}', f.meta["layers"][:20]])))
    else:  # two rows swapped in every column (a consistent table of the same layers)
        other = (row + 1) % rows
        for column in COLUMNS:
            table[column][row], table[column][other] = table[column][other], table[column][row]
        must_refuse = False
    try:
        raw = f.bytes(text)
    except (TypeError, ValueError, OverflowError):  # a value JSON or safetensors cannot write
        return
    accepted = _check_load(model, base, _write(folder, "table.safetensors", raw), positions[label])
    if must_refuse:
        assert accepted is None, f"{what} mutation was accepted"


# -- version 2: index codes and values ---------------------------------------------------------
@fuzz(800)
@given(kind=kinds, label=st.sampled_from(["v2", "v2_codes"]), data=st.data())
def test_mutated_v2_index_codes_and_values(setup, kind, label, data):
    """Truncated, padded or flipped codes, hostile offsets behind a matching checksum (out of
    range, unsorted, duplicated, one too many or few), codes of the wrong count, values that
    are NaN or of another dtype: refused naming the layer. Another valid code of the same
    positions, or a finite value, is accepted."""
    models, folder = setup
    model, base, files, positions = models[kind]
    f = file_kit.V2(files[label])
    seed = json.loads(f.meta["config"])["seed"]
    row = data.draw(st.integers(0, len(f.table["name"]) - 1))
    name, nnz = f.table["name"][row], f.table["nnz"][row]
    shape, transposed = tuple(f.table["shape"][row]), f.table["transposed"][row]
    code, body = f.code(row), f.codes[row]
    numel = shape[0] * shape[1]
    moves = ["hostile", "reencode", "value", "values_dtype", "count", "swap_names"]
    what = data.draw(st.sampled_from(moves + (["flip", "truncate", "extend"] if body.size else [])))
    must_refuse = must_accept = False
    layer = name  # the error must name this layer
    idx = positions[label][name].numpy()
    if what == "flip":
        bad = body.copy()
        for _ in range(data.draw(st.integers(1, 4))):
            bad[data.draw(st.integers(0, body.size - 1))] ^= 1 << data.draw(st.integers(0, 7))
        f.codes[row] = bad
        must_refuse = not np.array_equal(bad, body)  # the codes are canonical: other bytes, other offsets
    elif what in ("truncate", "extend"):
        cut = data.draw(st.integers(1, 3))
        extra = np.frombuffer(data.draw(st.binary(min_size=cut, max_size=cut)), dtype=np.uint8)
        f.codes[row] = body[:-cut] if what == "truncate" else np.concatenate([body, extra])
        delta = -cut if what == "truncate" else cut
        args = json.loads(json.dumps(code.args))
        if code.kind == "gaps":
            args[3] += delta
        elif code.kind == "struct":
            last = max(i for i in (1, 2, 3) if args[i])
            args[last][4] += delta
        else:  # int32: its length is the layer's count, so the tensors no longer match the table
            layer = None
        f.table["args"][row] = args
        must_refuse = True
    elif what == "hostile":
        how = data.draw(st.sampled_from(["out_of_range", "unsorted", "duplicate", "fewer", "more"]))
        x = {"out_of_range": np.concatenate([idx[:-1], [numel + data.draw(st.integers(0, 5))]]),
             "unsorted": idx[::-1].copy(), "duplicate": np.concatenate([idx[:1], idx[:-1]]),
             "fewer": idx[:-1], "more": np.union1d(idx, [int(np.setdiff1d(np.arange(numel), idx)[0])])}[how]
        if how in ("fewer", "more"):  # a consistent table: count and values follow the positions
            f.table["nnz"][row] = x.size
            f.values[row] = torch.cat([f.values[row], f.values[row][:1]])[: x.size]
        gap_coded = how in ("out_of_range", "fewer", "more") and data.draw(st.booleans())
        if gap_coded:  # the raw list packer: no checks of its own
            entry, pack = index_codes._list_code(x)
            f.set_code(row, IndexCode("gaps", entry[1:], checksum(x)), pack())
        else:
            f.set_code(row, IndexCode("int32", [], checksum(x)), x.astype("<i4").view(np.uint8))
        must_refuse = True
        layer = name if how not in ("fewer", "more") else None  # "fewer"/"more": another base's fingerprint
    elif what == "reencode":
        kinds_ = ["int32", "gaps", "struct"] + (["rand"] if code.kind == "rand" else [])
        other = data.draw(st.sampled_from(kinds_))
        f.set_code(row, *encode(torch.from_numpy(idx), shape, transposed, name, seed, kinds=(other,)))
        must_accept = True
    elif what == "value":
        pos = data.draw(st.integers(0, nnz - 1))
        f.values[row][pos] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -0.0,
                                                        0.0, 1e-45]))
        finite = bool(torch.isfinite(f.values[row]).all())
        must_refuse, must_accept = not finite, finite
    elif what == "values_dtype":
        dtype = data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32]))
        f.values = [v.to(dtype) for v in f.values]
        must_refuse = dtype == torch.int32
        must_accept = dtype in (torch.float64, torch.bfloat16)
        layer = None
    elif what == "count":
        f.table["nnz"][row] = nnz + data.draw(st.sampled_from([1, -1]))
        must_refuse, layer = True, None  # the values tensor no longer matches the table
    else:  # two layers' names swapped, their codes and values kept
        other = (row + 1) % len(f.table["name"])
        f.table["name"][row], f.table["name"][other] = f.table["name"][other], name
        must_refuse, layer = other != row, None
    accepted = _check_load(model, base, _write(folder, "codes.safetensors", f.bytes()), positions[label],
                           layer if must_refuse else None)
    assert not (must_refuse and accepted is not None), f"{what} mutation was accepted"
    assert not (must_accept and accepted is None), f"{what}: a valid file was refused"
    if what == "value" and must_accept:
        assert torch.equal(_bits(accepted[name].delta), _bits(f.values[row].float())), "loaded values differ"


# -- PEFT SHiRA folders ----------------------------------------------------------------------
@fuzz(700)
@given(data=st.data())
def test_mutated_peft_folders(setup, data):
    models, folder = setup
    model, base, files, _ = models["mlp"]
    peft = folder / "peft_fuzz"
    if peft.exists():
        for p in peft.iterdir():
            p.rmdir() if p.is_dir() else p.unlink()
    peft.mkdir(exist_ok=True)
    config = json.loads(files["peft_config"])
    config_bytes, weights = None, files["peft_weights"]
    what = data.draw(st.sampled_from(["config", "drop_key", "config_text", "weights_bytes",
                                      "weights_cut", "index", "value", "dtype", "keys", "files"]))
    must_refuse = must_accept = False
    if what == "config":
        config[data.draw(st.sampled_from(sorted(config) + ["unknown"]))] = data.draw(st.one_of(
            json_values, st.sampled_from([True, -3, 0, 2**70, "SHIRA", "LORA"])))
    elif what == "drop_key":
        del config[data.draw(st.sampled_from(sorted(config)))]
    elif what == "config_text":
        config_bytes = data.draw(st.one_of(
            broken_json.map(lambda s: s.encode("utf-8", "surrogatepass")),
            deep_json.map(str.encode), st.binary(max_size=16),
            st.just(json.dumps(config).encode("utf-16"))))
    elif what == "weights_bytes":
        raw = bytearray(weights)
        for pos, value in data.draw(byte_edits):
            raw[pos % len(raw)] = value
        weights = bytes(raw)
    elif what == "weights_cut":
        weights = weights[: data.draw(st.integers(0, len(weights) - 1))]
        must_refuse = True
    else:
        tensors = st_load(weights)
        keys = sorted(tensors)
        key = data.draw(st.sampled_from(keys))
        layer = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        out_f, in_f = model.get_submodule(layer).weight.shape
        t = tensors[key].clone()
        if what == "index":
            key = key.replace("shira_weight", "shira_indices")
            t = tensors[key].clone()
            row = data.draw(st.sampled_from([0, 1]))
            pos = data.draw(st.integers(0, t.shape[1] - 1))
            t[row, pos] = data.draw(st.sampled_from([-1, out_f if row == 0 else in_f, 10**6, 0]))
            must_refuse = int(t[row, pos]) < 0 or int(t[row, pos]) >= (out_f, in_f)[row]
        elif what == "value":
            key = key.replace("shira_indices", "shira_weight")
            t = tensors[key].clone()
            t[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
                st.sampled_from([float("nan"), float("inf"), 1e30, -0.0]))
            must_refuse, must_accept = not bool(torch.isfinite(t).all()), bool(torch.isfinite(t).all())
        elif what == "dtype":
            t = t.to(data.draw(st.sampled_from([torch.int64, torch.int8, torch.float16, torch.float32,
                                                torch.bfloat16, torch.float64, torch.bool])))
        else:  # keys: drop one, strip the prefix, transpose the indices, add a stray tensor
            how = data.draw(st.sampled_from(["drop", "unprefix", "transpose", "stray", "shorter"]))
            if how == "drop":
                del tensors[key]
                t = None
            elif how == "unprefix":
                tensors[key.removeprefix("base_model.model.")] = tensors.pop(key)
                t = None
            elif how == "transpose" and t.dim() == 2:
                t = t.t().contiguous()
            elif how == "stray":
                tensors["base_model.model.0.lora_A.weight"] = torch.zeros(2, 2)
            elif how == "shorter":
                t = t[..., :-1].contiguous()
        if t is not None:
            tensors[key] = t
        weights = st_save(tensors, metadata={"format": "pt"})
    if config_bytes is None:
        config_bytes = json.dumps(config).encode()
    if what == "files":
        how = data.draw(st.sampled_from(["no_config", "no_weights", "weights_dir", "pickle_only"]))
        if how != "no_config":
            (peft / "adapter_config.json").write_bytes(config_bytes)
        if how == "weights_dir":
            (peft / "adapter_model.safetensors").mkdir()
        if how == "pickle_only":  # a pickled checkpoint beside the config must not be read
            (peft / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
        must_refuse = True
    else:
        (peft / "adapter_config.json").write_bytes(config_bytes)
        (peft / "adapter_model.safetensors").write_bytes(weights)
    slots = _check_load(model, base, peft)
    assert not (must_refuse and slots is not None), f"{what} mutation was accepted"
    assert not (must_accept and slots is None), f"{what}: a finite new value was refused"


# -- regressions the fuzzer found, and hostile paths ----------------------------------------
def _regression_files(files) -> dict[str, bytes]:
    header, body = _split(files["v1"])
    out = {}
    for label, change in {
        "nnz_infinity": lambda L, m: L[sorted(L)[0]].update(nnz=float("inf")),
        "shape_infinity": lambda L, m: L[sorted(L)[0]].update(shape=[float("inf"), 3]),
        "deep_layers": lambda L, m: m.update(layers="[" * 100_000 + "]" * 100_000),
        "deep_config": lambda L, m: m.update(config="{\"a\":" * 50_000 + "1" + "}" * 50_000),
        "regex_overflow": lambda L, m: m.update(config=json.dumps(
            {**json.loads(m["config"]), "target_modules": "a{4294967296}"})),
        "regex_recursion": lambda L, m: m.update(config=json.dumps(
            {**json.loads(m["config"]), "target_modules": "(" * 100_000 + ")" * 100_000})),
    }.items():
        h = json.loads(json.dumps(header))
        layers = json.loads(h["__metadata__"]["layers"])
        change(layers, h["__metadata__"])
        if label.startswith(("nnz", "shape")):
            h["__metadata__"]["layers"] = json.dumps(layers)
        out[label] = _join(h, body)
    return out


def test_regressions_found_by_the_fuzzer(setup):
    """Each of these raised OverflowError, RecursionError or ShiraConfigError before, or (PEFT
    float indices) was silently truncated to integers and accepted."""
    models, folder = setup
    model, base, files, _ = models["mlp"]
    for label, raw in _regression_files(files).items():
        path = _write(folder, f"{label}.safetensors", raw)
        with pytest.raises(ShiraAdapterError, match="malformed") as info:
            shira_fx.AdapterBank(model).load("x", path)
        assert str(path) in str(info.value), label
    peft = folder / "peft_regress"
    peft.mkdir()
    tensors = st_load(files["peft_weights"])
    floats = lambda t: {k: (v.float() + 0.5 if "indices" in k else v) for k, v in t.items()}
    unnamed = lambda t: {**t, "base_model.model..shira_weight": torch.ones(1),
                         "base_model.model..shira_indices": torch.zeros(2, 1, dtype=torch.int32)}
    for label, config, change in [("r_true", {"r": True}, None), ("float_indices", {}, floats),
                                  ("empty_name", {}, unnamed)]:
        (peft / "adapter_config.json").write_text(json.dumps({**json.loads(files["peft_config"]), **config}))
        (peft / "adapter_model.safetensors").write_bytes(st_save(change(tensors) if change else tensors))
        if label == "r_true":  # r=True is dropped like any odd r; the adapter itself is fine
            assert _check_load(model, base, peft) is not None
        else:
            with pytest.raises(ShiraAdapterError, match="integer dtype|not named"):
                shira_fx.AdapterBank(model).load("x", peft)
    _assert_state(model, base, "by the regression files")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_or_device_is_refused_without_blocking(setup, tmp_path):
    models, _ = setup
    model, base, _, _ = models["mlp"]
    os.mkfifo(tmp_path / "fifo.safetensors")  # opening it for reading would block forever
    for path in (tmp_path / "fifo.safetensors", "/dev/zero"):
        with watchdog(CASE_TIMEOUT_S), pytest.raises(ShiraAdapterError, match="not a regular file"):
            shira_fx.AdapterBank(model).load("x", path)
    _assert_state(model, base, "by a FIFO")


def test_the_unmutated_files_load(setup):
    """The fuzzers start from files that do load: acceptance is possible, not just refusal."""
    models, folder = setup
    for kind, (model, base, files, positions) in models.items():
        for label in ("v1", "v2", "v2_codes"):
            path = _write(folder, f"plain_{kind}_{label}.safetensors", files[label])
            assert _check_load(model, base, path, positions[label]), (kind, label)
    model, base, _, _ = models["mlp"]
    assert _check_load(model, base, folder / "peft")
