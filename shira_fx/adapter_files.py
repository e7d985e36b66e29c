"""Every adapter file format, both ways: shira_fx safetensors files (version 2: a layer table,
index codes and values; version 1 still loads) and PEFT SHiRA directories, written atomically
and read lazily, with one validator for indices and values that files, `load_state_dict` and
checkpoints share.

Files are never unpickled: only safetensors (a JSON header + raw buffers) and JSON are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .atomic import atomic_save_file, atomic_write_text
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError
from .index_codes import IndexCode, IndexCodeError, code_size, decode, encode

FORMAT_NAME = "shira_fx"
FORMAT_VERSION = 2  # what `write_shira_fx` writes; version 1 files still load
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# version 2's layer table: one list per column, a row per layer (keys are not repeated per
# layer); "code", "args" and "check" are the layer's index code (`index_codes`)
COLUMNS = ("name", "shape", "dtype", "transposed", "nnz", "fingerprint", "code", "args", "check")
FINGERPRINT_DIGITS = {"1": 64, "2": 32}  # version 2 keeps 128 bits of the sha256
STORED_VALUES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}
# what a reader accepts in a file: shira_fx writes int32 indices and fp32 values; PEFT writes
# int64 indices and the values in the model's float dtype
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PEFT_INDEX_DTYPES = ("I8", "I16", "I32", "I64", "U8")
PEFT_VALUE_DTYPES = ("F16", "BF16", "F32", "F64")
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"


def parse_json(text: str, what: str) -> Any:
    """json.loads for text read from a file: a syntax error, nesting too deep for the parser
    (RecursionError) or an integer too long to convert all become ShiraAdapterError."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ShiraAdapterError(f"{what}: malformed JSON ({type(e).__name__}: {str(e)[:200]})") from e


def fingerprint(indices: Tensor, base: Tensor) -> str:
    """sha256 over the (int32) indices and the base values found there: identifies the base
    model an adapter was trained on without storing any of its weights."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(indices.detach().cpu().numpy(), dtype="<i4"))
    h.update(base.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def check_layer_tensors(idx: Tensor, vals: Tensor, shape: tuple[int, ...],
                        nnz: int | None = None, decoded: bool = False) -> tuple[Tensor, Tensor]:
    """One layer's indices and values as an adapter may hold them: 1-D integer indices, sorted,
    unique and in range for a weight of `shape` (as stored), as many 1-D finite float values
    (`nnz` of each when given). Returns (int64 indices, values); raises ValueError naming the
    problem (callers add the file and layer). `decoded`: the indices come from an index code
    decoded for this shape, which has checked their order and range (and their checksum)."""
    if not isinstance(idx, Tensor) or idx.dtype not in INDEX_DTYPES:
        raise ValueError(f"indices must be integers (int32/int64), found {getattr(idx, 'dtype', idx)!r:.40}")
    if not isinstance(vals, Tensor) or vals.dtype not in FLOAT_DTYPES or vals.dim() != 1:
        found = f"{vals.dtype} {tuple(vals.shape)}" if isinstance(vals, Tensor) else type(vals).__name__
        raise ValueError(f"values must be a 1-D float tensor, found {found}")
    if idx.dim() != 1:
        raise ValueError(f"indices must be 1-D, found shape {tuple(idx.shape)}")
    if nnz is not None and (idx.numel() != nnz or vals.numel() != nnz):
        raise ValueError(f"expected {nnz} indices and values, found {idx.numel()} and {vals.numel()}")
    if idx.numel() != vals.numel():
        raise ValueError(f"{idx.numel()} indices but {vals.numel()} values")
    # ranges are compared as Python ints: a hostile shape may not fit in int64
    numel = 1
    for size in shape:
        numel *= int(size)
    idx = idx.long()
    if not decoded and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("indices are not sorted and unique (a duplicate or out of order)")
    if not decoded and idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel):  # sorted: the ends
        raise ValueError(f"index out of range [0, {numel}) for a weight of shape {tuple(shape)}")
    if not bool(torch.isfinite(vals.float()).all()):
        raise ValueError("values contain NaN or Inf (or overflow fp32)")
    return idx, vals


def _peft_flat(idx: Tensor, vals: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """PEFT's (2, K) rows and columns of an (out, in) weight as sorted flat offsets (the
    values permuted alike)."""
    if idx.shape[0] != 2 or idx.dtype not in INDEX_DTYPES:
        raise ValueError(f"PEFT indices have shape {tuple(idx.shape)} {idx.dtype}, expected (2, K) integers")
    out_f, in_f = (int(s) for s in shape)
    rows, cols = idx[0].long(), idx[1].long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_f
                         or int(cols.min()) < 0 or int(cols.max()) >= in_f):
        raise ValueError(f"PEFT indices out of range for a weight of shape {tuple(shape)}")
    flat = rows * in_f + cols
    if isinstance(vals, Tensor) and vals.dim() == 1 and vals.numel() == flat.numel():
        order = torch.argsort(flat, stable=True)
        flat, vals = flat[order], vals[order]
    return flat, vals


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter says about one layer before any tensor is read. `shape` is the weight
    as stored; PEFT files carry no shape (None until checked against a model)."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str | None
    transposed: bool
    nnz: int
    fingerprint: str | None


class StoredAdapter:
    """An adapter kept out of any model: its config and layer specs, with indices and values
    read (and validated) only when `tensors` asks for a layer."""

    def __init__(self, source: str, cfg: ShiraConfig, layers: dict[str, LayerSpec], reader,
                 decodes: bool = False):
        self.source = source
        self.cfg = cfg
        self.layers = layers
        self._reader = reader  # (layer name) -> (raw indices, raw values)
        self._decodes = decodes  # the reader's indices are decoded and checked for each spec's shape

    @classmethod
    def in_memory(cls, source: str, cfg: ShiraConfig, layers: dict[str, LayerSpec],
                  tensors: Mapping[str, tuple[Tensor, Tensor]]) -> StoredAdapter:
        """An adapter held in memory (a snapshot of a SparseAdapter): `tensors` maps each
        layer to its (indices, values)."""
        return cls(source, cfg, layers, tensors.__getitem__)

    def error(self, problem: str, layer: str | None = None) -> ShiraAdapterError:
        where = f"layer {layer!r}: " if layer else ""
        return ShiraAdapterError(f"{self.source}: {where}{problem}")

    def tensors(self, name: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Flat int64 indices (sorted, unique, in range for `shape` as stored) and fp32 values
        of one layer, or ShiraAdapterError naming the file, the layer and the problem."""
        spec = self.layers[name]
        try:
            idx, vals = self._reader(name)
        except IndexCodeError as e:
            raise self.error(f"indices: {e}", name) from None
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
            raise self.error(f"cannot read tensors ({e})", name) from e
        try:
            if isinstance(idx, Tensor) and idx.dim() == 2:
                idx, vals = _peft_flat(idx, vals, shape)
            decoded = self._decodes and tuple(shape) == spec.shape
            idx, vals = check_layer_tensors(idx, vals, shape, spec.nnz, decoded)
        except ValueError as e:
            raise self.error(str(e), name) from None
        return idx, vals.float()

    def __repr__(self) -> str:
        return f"StoredAdapter({self.source!r}, layers={len(self.layers)})"


def _open_error(path: str, e: Exception) -> ShiraAdapterError:
    return ShiraAdapterError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                             f"{str(e)[:300]}")


def _read_pair(path: str, first: str, second: str):
    def read(name: str) -> tuple[Tensor, Tensor]:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(f"{name}{first}"), f.get_tensor(f"{name}{second}")

    return read


def _header(path: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """(metadata, {key: (shape, dtype string)}) of a safetensors file; nothing else is read."""
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise ShiraAdapterError(f"{path}: not a regular file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                      for k in f.keys()}
    except (SafetensorError, OSError, ValueError, OverflowError) as e:
        raise _open_error(path, e) from e
    return meta, shapes


def _int(value: Any) -> int:
    """An int from JSON metadata; floats (Infinity, 3.5), bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, found {value!r:.60}")
    return value


def _layer_spec(name: str, d: Any, fp_digits: int) -> LayerSpec:
    """One layer's metadata as `_specs_metadata` writes it, type-checked."""
    if not isinstance(d, dict):
        raise TypeError(f"expected an object, found {type(d).__name__}")
    shape = d["shape"]
    if not isinstance(shape, list) or len(shape) not in (2, 3, 4):
        raise TypeError(f"shape must be [out, in] (or [experts, out, in], or a convolution's "
                        f"[out, in / groups, *kernel]), found {shape!r:.60}")
    shape = tuple(_int(size) for size in shape)
    dtype, transposed, nnz, fp = d["dtype"], d["transposed"], _int(d["nnz"]), d["fingerprint"]
    if min(shape) < 1 or dtype not in WEIGHT_DTYPES:
        raise ValueError(f"bad shape {shape} or dtype {dtype!r:.30}")
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed must be true or false, found {transposed!r:.30}")
    if not 1 <= nnz <= math.prod(shape):
        raise ValueError(f"nnz {nnz} outside [1, numel]")
    if not isinstance(fp, str) or len(fp) != fp_digits or fp.strip("0123456789abcdef"):
        raise ValueError(f"fingerprint must be {fp_digits} hex digits, found {fp!r:.80}")
    return LayerSpec(name, shape, dtype, transposed, nnz, fp)


def _config(path: str, meta: dict[str, str]) -> ShiraConfig:
    for key in ("config", "layers"):
        if key not in meta:
            raise ShiraAdapterError(f"{path}: metadata is malformed: no {key!r} entry")
    raw_cfg = parse_json(meta["config"], f"{path}: metadata 'config'")
    try:
        if not isinstance(raw_cfg, dict):
            raise TypeError(f"config must be an object, found {type(raw_cfg).__name__}")
        return ShiraConfig.from_dict(raw_cfg)
    # a hostile target_modules regex can overflow or recurse in re.compile
    except (ValueError, TypeError, OverflowError, RecursionError, ShiraConfigError) as e:
        raise ShiraAdapterError(f"{path}: metadata is malformed: {str(e)[:300]}") from e


def _load_shira_fx(path: str) -> StoredAdapter:
    meta, shapes = _header(path)
    if meta.get("format") != FORMAT_NAME:
        raise ShiraAdapterError(f"{path}: not a shira_fx adapter (metadata format="
                                f"{meta.get('format')!r:.80}); PEFT SHiRA adapters are directories")
    if meta.get("format_version") not in ("1", "2"):
        raise ShiraAdapterError(f"{path}: format_version {meta.get('format_version')!r:.80} is not "
                                "supported (this shira_fx reads 1 and 2)")
    cfg = _config(path, meta)
    raw_layers = parse_json(meta["layers"], f"{path}: metadata 'layers'")
    return (_load_v1 if meta["format_version"] == "1" else _load_v2)(path, cfg, raw_layers, shapes)


def _load_v1(path: str, cfg: ShiraConfig, raw_layers: Any, shapes: dict[str, tuple]) -> StoredAdapter:
    """Version 1: per layer `<layer>.indices` (int32) and `<layer>.values`, specs by name."""
    if not isinstance(raw_layers, dict) or not raw_layers:
        raise ShiraAdapterError(f"{path}: metadata lists no layers")
    layers = {}
    for name, d in raw_layers.items():
        try:
            spec = _layer_spec(name, d, FINGERPRINT_DIGITS["1"])
        except (KeyError, ValueError, TypeError) as e:
            raise ShiraAdapterError(f"{path}: layer {name!r:.200}: malformed metadata ({e})") from e
        for key, dtypes in ((f"{name}.indices", ("I32", "I64")), (f"{name}.values", ("F32", "F64"))):
            if key not in shapes:
                raise ShiraAdapterError(f"{path}: layer {name!r}: tensor {key!r} is missing")
            if shapes[key][0] != (spec.nnz,) or shapes[key][1] not in dtypes:
                raise ShiraAdapterError(f"{path}: layer {name!r}: {key} is {shapes[key][1]} "
                                        f"{shapes[key][0]}, expected ({spec.nnz},) {'/'.join(dtypes)}")
        layers[name] = spec
    extra = sorted(set(shapes) - {f"{n}.{s}" for n in layers for s in ("indices", "values")})
    if extra:
        raise ShiraAdapterError(f"{path}: tensors not described by the metadata: {extra[:5]}")
    return StoredAdapter(path, cfg, layers, _read_pair(path, ".indices", ".values"))


def _load_v2(path: str, cfg: ShiraConfig, table: Any, shapes: dict[str, tuple]) -> StoredAdapter:
    """Version 2: the layer table (`COLUMNS`), every layer's values in one tensor `values` and
    its index code's bytes in one uint8 tensor `indices` (absent when no code has any), each
    layer a slice of both, in table order."""
    if not isinstance(table, dict) or set(table) != set(COLUMNS):
        raise ShiraAdapterError(f"{path}: metadata 'layers' must be a table with the columns "
                                f"{', '.join(COLUMNS)}")
    columns = [table[c] for c in COLUMNS]
    if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1 or not columns[0]:
        raise ShiraAdapterError(f"{path}: metadata 'layers' needs one non-empty list per column, all of "
                                "one length")
    layers, slices, values_at, bytes_at = {}, {}, 0, 0
    for name, *fields, kind, args, check in zip(*columns, strict=True):
        if not isinstance(name, str) or not name or name in layers:
            raise ShiraAdapterError(f"{path}: layer names must be distinct non-empty strings, found "
                                    f"{name!r:.200}")
        try:
            spec = _layer_spec(name, dict(zip(COLUMNS[1:6], fields, strict=True)), FINGERPRINT_DIGITS["2"])
            code = IndexCode(kind, args, check)
            size = code_size(code, spec.nnz, spec.shape, spec.transposed)
        except (KeyError, ValueError, TypeError) as e:
            raise ShiraAdapterError(f"{path}: layer {name!r}: malformed metadata ({e})") from e
        layers[name] = spec
        slices[name] = (code, values_at, bytes_at, size)
        values_at, bytes_at = values_at + spec.nnz, bytes_at + size
    expected = {"values": ((values_at,), tuple(STORED_VALUES.values()))}
    if bytes_at:
        expected["indices"] = ((bytes_at,), ("U8",))
    for key, (shape, dtypes) in expected.items():
        if key not in shapes:
            raise ShiraAdapterError(f"{path}: tensor {key!r} is missing")
        if shapes[key][0] != shape or shapes[key][1] not in dtypes:
            raise ShiraAdapterError(f"{path}: tensor {key!r} is {shapes[key][1]} {shapes[key][0]}, the "
                                    f"layer table needs {shape} {'/'.join(dtypes)}")
    if set(shapes) - set(expected):
        raise ShiraAdapterError(f"{path}: tensors not described by the metadata: "
                                f"{sorted(set(shapes) - set(expected))[:5]}")

    def read(name: str) -> tuple[Tensor, Tensor]:
        spec, (code, at, start, size) = layers[name], slices[name]
        with safe_open(path, framework="pt") as f:
            vals = f.get_slice("values")[at: at + spec.nnz]
            data = f.get_slice("indices")[start: start + size] if size else torch.empty(0, dtype=torch.uint8)
        return decode(code, data.numpy(), spec.nnz, spec.shape, spec.transposed, name, cfg.seed), vals

    return StoredAdapter(path, cfg, layers, read, decodes=True)


def _load_peft_dir(path: str) -> StoredAdapter:
    cfg_path = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, PEFT_WEIGHTS)
    if not os.path.isfile(cfg_path):
        raise ShiraAdapterError(f"{path}: no adapter_config.json file")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError) as e:
        raise ShiraAdapterError(f"{path}: no readable adapter_config.json ({e})") from e
    peft_cfg = parse_json(text, cfg_path)
    if not isinstance(peft_cfg, dict) or peft_cfg.get("peft_type") != "SHIRA":
        kind = peft_cfg.get("peft_type") if isinstance(peft_cfg, dict) else None
        raise ShiraAdapterError(f"{path}: a PEFT {kind!r:.80} adapter, not SHiRA")
    if not os.path.exists(weights):
        raise ShiraAdapterError(f"{path}: {PEFT_WEIGHTS} is missing (pickled .bin files are "
                                "never loaded)")
    _, shapes = _header(weights)
    layers = {}
    for key, (shape, dtype) in shapes.items():
        if not key.endswith(".shira_weight"):
            continue
        name = key.removesuffix(".shira_weight").removeprefix(PEFT_PREFIX)
        if not key.startswith(PEFT_PREFIX) or not name:
            raise ShiraAdapterError(f"{weights}: tensor {key!r:.200} is not named "
                                    f"{PEFT_PREFIX}<module>.shira_weight")
        idx_key = key.removesuffix(".shira_weight") + ".shira_indices"
        if idx_key not in shapes or len(shape) != 1 or shapes[idx_key][0] != (2, shape[0]):
            raise ShiraAdapterError(f"{weights}: layer {name!r}: shira_indices missing or not "
                                    f"(2, {shape[0] if shape else '?'})")
        if shape[0] < 1:
            raise ShiraAdapterError(f"{weights}: layer {name!r}: holds no values")
        if dtype not in PEFT_VALUE_DTYPES or shapes[idx_key][1] not in PEFT_INDEX_DTYPES:
            raise ShiraAdapterError(f"{weights}: layer {name!r}: shira_weight is {dtype} and "
                                    f"shira_indices {shapes[idx_key][1]}, expected "
                                    f"{'/'.join(PEFT_VALUE_DTYPES)} and an integer dtype")
        layers[name] = LayerSpec(name, None, None, False, shape[0], None)
    if not layers:
        raise ShiraAdapterError(f"{weights}: holds no shira_weight tensors")
    r, seed = peft_cfg.get("r"), peft_cfg.get("random_seed")
    try:  # r and the seed only describe the adapter; an odd value is dropped, not fatal
        cfg = ShiraConfig(target_modules=sorted(layers),
                          r=r if type(r) is int and r > 0 else None,
                          mask="rand", seed=seed if type(seed) is int else 0)
    except ShiraConfigError as e:
        raise ShiraAdapterError(f"{cfg_path}: {e}") from e

    def read(name: str) -> tuple[Tensor, Tensor]:
        with safe_open(weights, framework="pt") as f:
            prefix = f"{PEFT_PREFIX}{name}"
            return f.get_tensor(f"{prefix}.shira_indices"), f.get_tensor(f"{prefix}.shira_weight")

    return StoredAdapter(path, cfg, layers, read)


def load_adapter(path: str | os.PathLike) -> StoredAdapter:
    """Open a shira_fx adapter file or a PEFT SHiRA directory. Only the header is read now;
    every tensor is validated when a bank loads it. Raises ShiraAdapterError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_peft_dir(path)
    if not os.path.exists(path):
        raise ShiraAdapterError(f"{path}: no such adapter file or directory")
    return _load_shira_fx(path)


def write_shira_fx(path: str | os.PathLike, cfg: ShiraConfig, specs: Mapping[str, LayerSpec],
                   tensors: Mapping[str, tuple[Tensor, Tensor]],
                   values_dtype: torch.dtype | None = None) -> None:
    """Write a shira_fx adapter file (version 2), atomically: the layer table in the metadata,
    each layer's indices in the smallest exact index code (`index_codes.encode`, which decodes
    its choice back first), its values as held or, when `values_dtype` is given (bf16: half the
    bytes, rounded), in that dtype."""
    if values_dtype is not None and values_dtype not in STORED_VALUES:
        raise ShiraAdapterError(f"{path}: values_dtype must be one of "
                                f"{', '.join(str(d) for d in STORED_VALUES)}, found {values_dtype!r}")
    table: dict[str, list] = {c: [] for c in COLUMNS}
    values, blobs = [], []
    for name, spec in specs.items():
        idx, vals = tensors[name]
        code, data = encode(idx, spec.shape, spec.transposed, name, cfg.seed if cfg.mask == "rand" else None)
        vals = vals.detach().cpu().to(values_dtype or vals.dtype)
        if not bool(torch.isfinite(vals).all()):
            raise ShiraAdapterError(f"{path}: layer {name!r}: values overflow {vals.dtype} (or are "
                                    "not finite)")
        row = (name, list(spec.shape), spec.dtype, spec.transposed, spec.nnz,
               spec.fingerprint[: FINGERPRINT_DIGITS["2"]], code.kind, code.args, code.check)
        for column, value in zip(COLUMNS, row, strict=True):
            table[column].append(value)
        values.append(vals)
        blobs.append(data)
    flat = {"values": torch.cat(values)}
    if sum(b.size for b in blobs):
        flat["indices"] = torch.from_numpy(np.concatenate(blobs))
    atomic_save_file(flat, path, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                           "config": cfg.to_json(),
                                           "layers": json.dumps(table, separators=(",", ":"))})


def peft_rank(specs: Mapping[str, LayerSpec]) -> int:
    """The smallest r for which every layer's values fit in PEFT's r*(out+in) per layer."""
    return max(-(-spec.nnz // (spec.shape[0] + spec.shape[1])) for spec in specs.values())


def _padded(idx: Tensor, vals: Tensor, size: int, numel: int) -> tuple[Tensor, Tensor]:
    """`idx`, `vals` grown to `size` entries with zero values at the lowest offsets the mask
    does not hold (a zero adds nothing when PEFT merges), sorted again."""
    need = size - idx.numel()
    if need == 0:
        return idx, vals
    free = torch.ones(min(numel, idx.numel() + need), dtype=torch.bool)
    free[idx[idx < free.numel()]] = False
    extra = free.nonzero().view(-1)[:need]
    idx = torch.cat([idx, extra])
    vals = torch.cat([vals, torch.zeros(need, dtype=vals.dtype)])
    order = torch.argsort(idx)
    return idx[order], vals[order]


def write_peft(directory: str | os.PathLike, cfg: ShiraConfig, specs: Mapping[str, LayerSpec],
               tensors: Mapping[str, tuple[Tensor, Tensor]]) -> int:
    """Write a PEFT SHiRA directory that `PeftModel.from_pretrained` loads; returns its r.

    PEFT holds exactly r*(out+in) values per nn.Linear layer, so each layer is padded to the
    smallest r that fits them all, with zero values at positions the mask does not hold: PEFT's
    merged model then computes exactly what this adapter does. PEFT SHiRA has no Conv1D layer.
    """
    for name, spec in specs.items():
        if spec.transposed:
            raise ShiraAdapterError(f"to_peft: layer {name!r} is a transformers Conv1D (weight stored "
                                    "(in, out)); PEFT SHiRA supports only nn.Linear")
        if len(spec.shape) != 2:
            raise ShiraAdapterError(f"to_peft: layer {name!r} is a {len(spec.shape)}-D parameter "
                                    f"{spec.shape}; PEFT SHiRA supports only nn.Linear weights")
    r = peft_rank(specs)
    out = {}
    for name, spec in specs.items():
        out_f, in_f = spec.shape
        if r * (out_f + in_f) > out_f * in_f:
            raise ShiraAdapterError(f"to_peft: layer {name!r} would need r*(out+in) = "
                                    f"{r * (out_f + in_f)} positions, more than its {out_f * in_f} "
                                    f"weights (r={r} is set by the densest layer)")
        idx, vals = tensors[name]
        idx, vals = _padded(idx.detach().long().cpu(), vals.detach().float().cpu(),
                            r * (out_f + in_f), out_f * in_f)
        out[f"{PEFT_PREFIX}{name}.shira_indices"] = torch.stack([idx // in_f, idx % in_f]).int()
        out[f"{PEFT_PREFIX}{name}.shira_weight"] = vals.contiguous()
    peft_cfg = {
        "peft_type": "SHIRA", "r": r, "mask_type": "random", "random_seed": cfg.seed,
        "target_modules": sorted(specs), "fan_in_fan_out": False, "init_weights": True,
        "modules_to_save": None, "inference_mode": True, "task_type": None,
        "base_model_name_or_path": None, "revision": None,
    }
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ShiraAdapterError(f"to_peft: {directory} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ShiraAdapterError(f"to_peft: cannot create the directory {directory} ({e})") from e
    atomic_save_file(out, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    atomic_write_text(json.dumps(peft_cfg, indent=2, sort_keys=True),
                      os.path.join(directory, "adapter_config.json"))
    return r
