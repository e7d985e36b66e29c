"""Adapter files: shira_fx safetensors files and PEFT SHiRA directories, read lazily and
validated before anything can reach a model; PEFT SHiRA directories written for PEFT to load.

Files are never unpickled: only safetensors (a JSON header + raw buffers) and JSON are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError

if TYPE_CHECKING:
    from .adapter import SparseAdapter

FORMAT_NAME = "shira_fx"
FORMAT_VERSION = 1
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64")
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"


def atomic_save_file(tensors: dict[str, Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors `save_file` into a temp file in the same folder, then `os.replace`: a crash
    mid-write leaves the previous file at `path` intact (at worst a stray `.shira-*.tmp`)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".shira-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fingerprint(indices: Tensor, base: Tensor) -> str:
    """sha256 over the (int32) indices and the base values found there: identifies the base
    model an adapter was trained on without storing any of its weights."""
    h = hashlib.sha256()
    h.update(indices.detach().to(torch.int32).cpu().numpy().tobytes())
    h.update(base.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter says about one layer before any tensor is read. `shape` is the weight
    as stored; PEFT files carry no shape (None until checked against a model)."""

    name: str
    shape: tuple[int, int] | None
    dtype: str | None
    transposed: bool
    nnz: int
    fingerprint: str | None


class StoredAdapter:
    """An adapter kept out of any model: its config and layer specs, with indices and values
    read (and validated) only when `tensors` asks for a layer."""

    def __init__(self, source: str, cfg: ShiraConfig, layers: dict[str, LayerSpec], reader):
        self.source = source
        self.cfg = cfg
        self.layers = layers
        self._reader = reader  # (layer name) -> (raw indices, raw values)

    def error(self, problem: str, layer: str | None = None) -> ShiraAdapterError:
        where = f"layer {layer!r}: " if layer else ""
        return ShiraAdapterError(f"{self.source}: {where}{problem}")

    def tensors(self, name: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Flat int64 indices (sorted, unique, in range for `shape` as stored) and fp32 values
        of one layer, or ShiraAdapterError naming the file, the layer and the problem."""
        spec = self.layers[name]
        try:
            idx, vals = self._reader(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise self.error(f"cannot read tensors ({e})", name) from e
        numel = shape[0] * shape[1]
        if idx.dim() == 2:  # PEFT: (2, K) rows and columns of an (out, in) weight
            if idx.shape[0] != 2:
                raise self.error(f"PEFT indices have shape {tuple(idx.shape)}, expected (2, K)", name)
            rows, cols = idx[0].long(), idx[1].long()
            if rows.numel() and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0
                                 or cols.max() >= shape[1]):
                raise self.error(f"PEFT indices out of range for a weight of shape {shape}", name)
            idx = rows * shape[1] + cols
            if vals.dim() == 1 and vals.numel() == idx.numel():
                order = torch.argsort(idx, stable=True)
                idx, vals = idx[order], vals[order]
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise self.error(f"indices must be 1-D int32/int64, found {idx.dtype} "
                             f"{tuple(idx.shape)}", name)
        if vals.dim() != 1 or not vals.is_floating_point():
            raise self.error(f"values must be a 1-D float tensor, found {vals.dtype} "
                             f"{tuple(vals.shape)}", name)
        if idx.numel() != spec.nnz or vals.numel() != spec.nnz:
            raise self.error(f"expected {spec.nnz} indices and values, found {idx.numel()} "
                             f"and {vals.numel()}", name)
        idx = idx.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= numel):
            raise self.error(f"index out of range [0, {numel}) for a weight of shape {shape}", name)
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise self.error("indices are not sorted and unique (a duplicate or out of order)", name)
        vals = vals.float()
        if not bool(torch.isfinite(vals).all()):
            raise self.error("values contain NaN or Inf", name)
        return idx, vals

    def __repr__(self) -> str:
        return f"StoredAdapter({self.source!r}, layers={len(self.layers)})"


def _open_error(path: str, e: Exception) -> ShiraAdapterError:
    return ShiraAdapterError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}")


def _read_pair(path: str, first: str, second: str):
    def read(name: str) -> tuple[Tensor, Tensor]:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(f"{name}{first}"), f.get_tensor(f"{name}{second}")

    return read


def _load_shira_fx(path: str) -> StoredAdapter:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                      for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _open_error(path, e) from e
    if meta.get("format") != FORMAT_NAME:
        raise ShiraAdapterError(f"{path}: not a shira_fx adapter (metadata format="
                                f"{meta.get('format')!r}); PEFT SHiRA adapters are directories")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ShiraAdapterError(f"{path}: format_version {meta.get('format_version')!r} is not "
                                f"supported (this shira_fx reads {FORMAT_VERSION})")
    try:
        cfg = ShiraConfig.from_dict(json.loads(meta["config"]))
        raw_layers = json.loads(meta["layers"])
    except (KeyError, ValueError, TypeError, ShiraConfigError) as e:
        raise ShiraAdapterError(f"{path}: metadata is malformed: {e}") from e
    if not isinstance(raw_layers, dict) or not raw_layers:
        raise ShiraAdapterError(f"{path}: metadata lists no layers")
    layers = {}
    for name, d in raw_layers.items():
        try:
            shape = tuple(int(s) for s in d["shape"])
            spec = LayerSpec(name, shape, str(d["dtype"]), bool(d["transposed"]), int(d["nnz"]),
                             str(d["fingerprint"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ShiraAdapterError(f"{path}: layer {name!r}: malformed metadata ({e})") from e
        if len(shape) != 2 or min(shape) < 1 or spec.dtype not in WEIGHT_DTYPES:
            raise ShiraAdapterError(f"{path}: layer {name!r}: bad shape {shape} or dtype {spec.dtype}")
        if not 1 <= spec.nnz <= shape[0] * shape[1]:
            raise ShiraAdapterError(f"{path}: layer {name!r}: nnz {spec.nnz} outside [1, numel]")
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


def _load_peft_dir(path: str) -> StoredAdapter:
    cfg_path = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, PEFT_WEIGHTS)
    try:
        with open(cfg_path) as f:
            peft_cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ShiraAdapterError(f"{path}: no readable adapter_config.json ({e})") from e
    if not isinstance(peft_cfg, dict) or peft_cfg.get("peft_type") != "SHIRA":
        kind = peft_cfg.get("peft_type") if isinstance(peft_cfg, dict) else None
        raise ShiraAdapterError(f"{path}: a PEFT {kind} adapter, not SHiRA")
    if not os.path.exists(weights):
        raise ShiraAdapterError(f"{path}: {PEFT_WEIGHTS} is missing (pickled .bin files are "
                                "never loaded)")
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _open_error(weights, e) from e
    layers = {}
    for key, shape in shapes.items():
        if not key.endswith(".shira_weight"):
            continue
        name = key.removesuffix(".shira_weight").removeprefix(PEFT_PREFIX)
        idx_key = key.replace(".shira_weight", ".shira_indices")
        if idx_key not in shapes or len(shape) != 1 or shapes[idx_key] != (2, shape[0]):
            raise ShiraAdapterError(f"{weights}: layer {name!r}: shira_indices missing or not "
                                    f"(2, {shape[0] if shape else '?'})")
        layers[name] = LayerSpec(name, None, None, False, shape[0], None)
    if not layers:
        raise ShiraAdapterError(f"{weights}: holds no shira_weight tensors")
    r = peft_cfg.get("r")
    seed = peft_cfg.get("random_seed")
    cfg = ShiraConfig(target_modules=sorted(layers), r=r if isinstance(r, int) and r > 0 else None,
                      mask="rand", seed=seed if isinstance(seed, int) else 0)

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


def from_adapter(adapter: SparseAdapter, source: str = "<SparseAdapter>") -> StoredAdapter:
    """A snapshot of an in-memory SparseAdapter (its current values), as a StoredAdapter."""
    snap = {n: (la.indices.detach().cpu().clone(), la.values.detach().cpu().clone())
            for n, la in adapter.layers.items()}
    layers = {
        n: LayerSpec(n, la.shape, str(la.weight.dtype).removeprefix("torch."), la.transposed,
                     la.indices.numel(), la.fingerprint())
        for n, la in adapter.layers.items()
    }
    return StoredAdapter(source, adapter.cfg, layers, snap.__getitem__)


def write_peft(adapter: SparseAdapter, directory: str | os.PathLike) -> None:
    """Write `adapter` as a PEFT SHiRA directory that `PeftModel.from_pretrained` loads.

    PEFT sizes every layer as r*(out+in) values and supports only nn.Linear, so the adapter
    must have been prepared with `r` on nn.Linear layers.
    """
    cfg = adapter.cfg
    if cfg.r is None:
        raise ShiraAdapterError("to_peft: PEFT SHiRA stores r*(out+in) values per layer; prepare "
                                "the adapter with ShiraConfig(r=...) instead of density")
    for name, layer in adapter.layers.items():
        if layer.transposed:
            raise ShiraAdapterError(f"to_peft: layer {name!r} is a Conv1D; PEFT SHiRA supports "
                                    "only nn.Linear")
        out_f, in_f = layer.shape
        if layer.indices.numel() != cfg.r * (out_f + in_f):
            raise ShiraAdapterError(f"to_peft: layer {name!r} has {layer.indices.numel()} values; "
                                    f"PEFT expects r*(out+in) = {cfg.r * (out_f + in_f)}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, layer in adapter.layers.items():
        idx = layer.indices.detach().long().cpu()
        in_f = layer.shape[1]
        tensors[f"{PEFT_PREFIX}{name}.shira_indices"] = torch.stack([idx // in_f, idx % in_f]).int()
        tensors[f"{PEFT_PREFIX}{name}.shira_weight"] = layer.values.detach().float().cpu().contiguous()
    peft_cfg = {
        "peft_type": "SHIRA", "r": cfg.r, "mask_type": "random", "random_seed": cfg.seed,
        "target_modules": sorted(adapter.layers), "fan_in_fan_out": False, "init_weights": True,
        "modules_to_save": None, "inference_mode": True, "task_type": None,
        "base_model_name_or_path": None, "revision": None,
    }
    save_file(tensors, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_cfg, f, indent=2, sort_keys=True)
