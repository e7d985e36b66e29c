"""Adapter files taken apart and put back together, for the tests that corrupt them: the
version 1 writer (shira_fx reads version 1 but writes only version 2; the fixture
`tests/data/v1_mlp.safetensors` is a file the version 1 writer itself produced) and a version
2 file as its parts (metadata, layer table, values, each layer's index-code bytes)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import shira_fx
from shira_fx.index_codes import IndexCode, code_size

FIXTURE_V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "v1_mlp.safetensors")


def v1_bytes(adapter: shira_fx.SparseAdapter) -> bytes:
    """A version 1 file: `<layer>.indices` (int32) and `<layer>.values` per layer, and the
    metadata by layer name, as the version 1 writer wrote them."""
    layers, flat = {}, {}
    for name, layer in adapter.layers.items():
        spec = layer.spec()
        layers[name] = {"shape": list(spec.shape), "dtype": spec.dtype, "transposed": spec.transposed,
                        "nnz": spec.nnz, "fingerprint": spec.fingerprint}
        flat[f"{name}.indices"] = layer.indices.detach().to(torch.int32).contiguous()
        flat[f"{name}.values"] = layer.values.detach().contiguous()
    meta = {"format": "shira_fx", "format_version": "1", "config": adapter.cfg.to_json(),
            "layers": json.dumps(layers, sort_keys=True)}
    return st_save(flat, metadata=meta)


def header(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its body."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(head: dict, body: bytes) -> bytes:
    raw = json.dumps(head).encode()
    return struct.pack("<Q", len(raw)) + raw + body


class V2:
    """A version 2 file as parts to edit: `meta` (the safetensors metadata), `table` (the layer
    table, columns of lists), `values` (each layer's, in table order) and `codes` (each
    layer's index-code bytes, uint8)."""

    def __init__(self, data: bytes):
        tensors = st_load(data)
        self.meta = header(data)[0]["__metadata__"]
        self.table = json.loads(self.meta["layers"])
        flat, blob = tensors["values"], tensors.get("indices", torch.empty(0, dtype=torch.uint8)).numpy()
        self.values, self.codes = [], []
        at = start = 0
        for row in range(len(self.table["name"])):
            nnz, shape, transposed = (self.table[c][row] for c in ("nnz", "shape", "transposed"))
            size = code_size(self.code(row), nnz, tuple(shape), transposed)
            self.values.append(flat[at: at + nnz].clone())
            self.codes.append(blob[start: start + size].copy())
            at, start = at + nnz, start + size

    def row(self, name: str) -> int:
        return self.table["name"].index(name)

    def code(self, row: int) -> IndexCode:
        return IndexCode(self.table["code"][row], self.table["args"][row], self.table["check"][row])

    def set_code(self, row: int, code: IndexCode, data: np.ndarray) -> None:
        for column, value in (("code", code.kind), ("args", code.args), ("check", code.check)):
            self.table[column][row] = value
        self.codes[row] = data

    def bytes(self, layers_text: str | None = None) -> bytes:
        meta = {**self.meta, "layers": json.dumps(self.table) if layers_text is None else layers_text}
        tensors = {"values": torch.cat(self.values)}
        blob = np.concatenate(self.codes) if self.codes else np.empty(0, dtype=np.uint8)
        if blob.size:
            tensors["indices"] = torch.from_numpy(blob.astype(np.uint8))
        return st_save(tensors, metadata=meta)
