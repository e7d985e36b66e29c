"""Hostile adapter files: 4,000 mutated shira_fx files and PEFT SHiRA folders, grown from valid
ones. Each either loads as a valid adapter or raises ShiraAdapterError naming the file; never
another exception, a hang, a write outside the adapter's positions or a changed base weight
(checked bit for bit after a refused load, and after activate + deactivate of an accepted
one); nothing is ever unpickled. Where a mutation's outcome is certain (an index out of range,
a NaN, a finite new value) the test also says which outcome it must be."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import shira_fx
from shira_fx import ShiraAdapterError
from tests import file_kit, tiny_models
from tests.conftest import budget

pytestmark = pytest.mark.fuzz


def fuzz(n: int):
    return settings(max_examples=budget(n), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


CASE_TIMEOUT_S = 20  # one load takes milliseconds; a case this slow is a hang


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per model kind: the model at its base, a bit copy of its state and the valid files."""
    folder = tmp_path_factory.mktemp("fuzz")
    out = {}
    for kind, cfg in (("mlp", shira_fx.ShiraConfig(r=2, seed=3)),      # nn.Linear, PEFT-compatible
                      ("gpt2", shira_fx.ShiraConfig(density=0.02, seed=1))):  # Conv1D (transposed)
        model = tiny_models.build(kind)
        adapter = shira_fx.prepare(model, cfg, progress=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.values.copy_(torch.randn(layer.values.shape, generator=g) * 0.1)
        files = {"shira": file_kit.v1_bytes(adapter)}
        if kind == "mlp":
            adapter.to_peft(folder / "peft")
            files["peft_config"] = (folder / "peft" / "adapter_config.json").read_bytes()
            files["peft_weights"] = (folder / "peft" / "adapter_model.safetensors").read_bytes()
        adapter.remove()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        out[kind] = (model, base, files)
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


def _check_load(model, base, path) -> dict | None:
    """Load `path` (the stored reader alone, then into a fresh bank). Returns the bank's slots
    if accepted, after checking they are valid and that activate writes exactly base + delta
    at them and deactivate restores the base; None if refused with ShiraAdapterError naming
    the file. Anything else fails the test."""
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
            _assert_state(model, base, f"by a refused load of {path}")
            return None
        slots = bank._adapters["x"]
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
byte_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
deep_json = st.integers(900, 50_000).map(lambda d: "[" * d + "]" * d)
broken_json = st.sampled_from(["", "{", "[1,", "nul", '{"a": }', "\udcff", "{\"a\": 1}}", "NaN"])


# -- bytes: flipped bytes, truncation, extension, the 8-byte header length -------------------
@fuzz(600)
@given(kind=kinds, edits=byte_edits, in_header=st.booleans())
def test_flipped_bytes(setup, kind, edits, in_header):
    models, folder = setup
    model, base, files = models[kind]
    data = bytearray(files["shira"])
    n = struct.unpack("<Q", data[:8])[0]
    span = n + 8 if in_header else len(data)
    for pos, value in edits:
        data[pos % span] = value
    _check_load(model, base, _write(folder, "flipped.safetensors", bytes(data)))


@fuzz(500)
@given(kind=kinds, cut=st.integers(0, 10**6), extra=st.binary(max_size=64), length=st.one_of(
    st.none(), st.integers(0, 2**64 - 1), st.integers(0, 4096),
    st.integers(-16, 16).map(lambda d: ("rel", d))))
def test_truncated_extended_and_bad_header_length(setup, kind, cut, extra, length):
    models, folder = setup
    model, base, files = models[kind]
    data = files["shira"]
    real = struct.unpack("<Q", data[:8])[0]
    data = data[: cut % (len(data) + 1)] + extra
    if length is not None and len(data) >= 8:
        n = real + length[1] if isinstance(length, tuple) else length
        data = struct.pack("<Q", max(n, 0)) + data[8:]
    _check_load(model, base, _write(folder, "cut.safetensors", data))


# -- the safetensors header's tensor entries -------------------------------------------------
@fuzz(600)
@given(kind=kinds, data=st.data())
def test_mutated_header_entries(setup, kind, data):
    models, folder = setup
    model, base, files = models[kind]
    header, body = _split(files["shira"])
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
    _check_load(model, base, _write(folder, "entries.safetensors", raw))


# -- the metadata: format, version, config and layers JSON ----------------------------------
@fuzz(800)
@given(kind=kinds, data=st.data())
def test_mutated_metadata(setup, kind, data):
    models, folder = setup
    model, base, files = models[kind]
    header, body = _split(files["shira"])
    meta = header["__metadata__"]
    what = data.draw(st.sampled_from(["format", "version", "drop_key", "add_key", "config",
                                      "config_text", "layers_text", "layer_field", "drop_field",
                                      "layer_name", "drop_layer", "fingerprint", "shape"]))
    layers = json.loads(meta["layers"])
    name = data.draw(st.sampled_from(sorted(layers)))
    if what == "format":
        meta["format"] = data.draw(st.sampled_from(["", "shira", "pt", "SHIRA_FX", "shira_fx "]))
    elif what == "version":
        meta["format_version"] = data.draw(st.sampled_from(["0", "2", "1.0", " 1", "01", "", "999"]))
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
    accepted = _check_load(model, base, path) is not None
    if what in ("version", "drop_layer", "fingerprint", "shape", "config_text", "layers_text"):
        assert not accepted, f"{what} mutation was accepted"


# -- the tensors: index and value contents, dtypes, lengths (a consistent file) -------------
@fuzz(800)
@given(kind=kinds, data=st.data())
def test_mutated_indices_and_values(setup, kind, data):
    models, folder = setup
    model, base, files = models[kind]
    tensors = st_load(files["shira"])
    header, _ = _split(files["shira"])
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
    original = st_load(files["shira"])[f"{name}.indices"]
    same_idx = idx.shape == original.shape and idx.dtype in (torch.int32, torch.int64) \
        and torch.equal(idx.long(), original.long())
    if not same_idx or (what == "value" and not bool(torch.isfinite(vals.float()).all())):
        assert slots is None, f"{what} mutation was accepted"  # fingerprint covers the indices
    if what == "value" and bool(torch.isfinite(vals).all()):
        assert slots is not None, "a finite new value was refused"
        assert torch.equal(_bits(slots[name].delta), _bits(vals.float())), "loaded values differ"


# -- PEFT SHiRA folders ----------------------------------------------------------------------
@fuzz(700)
@given(data=st.data())
def test_mutated_peft_folders(setup, data):
    models, folder = setup
    model, base, files = models["mlp"]
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
    header, body = _split(files["shira"])
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
    model, base, files = models["mlp"]
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
    model, base, _ = models["mlp"]
    os.mkfifo(tmp_path / "fifo.safetensors")  # opening it for reading would block forever
    for path in (tmp_path / "fifo.safetensors", "/dev/zero"):
        with watchdog(CASE_TIMEOUT_S), pytest.raises(ShiraAdapterError, match="not a regular file"):
            shira_fx.AdapterBank(model).load("x", path)
    _assert_state(model, base, "by a FIFO")


def test_the_unmutated_files_load(setup):
    """The fuzzers start from files that do load: acceptance is possible, not just refusal."""
    models, folder = setup
    for kind, (model, base, files) in models.items():
        assert _check_load(model, base, _write(folder, f"plain_{kind}.safetensors", files["shira"]))
    model, base, _ = models["mlp"]
    assert _check_load(model, base, folder / "peft")
