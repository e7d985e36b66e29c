"""Index codes: how a shira_fx file (format 2) stores one layer's indices, the sorted unique
flat offsets into its weight as stored, exactly and in as few bytes as it can.

- ``rand``: the recipe alone, args ``[generator version, matrices]``. The mask is
  regenerated from the config's seed, the layer's name and its count by `masks.rand_mask`
  (the project's own generator, `sampler`); `matrices` is how many equal blocks (MoE experts)
  each take a share of the count.
- ``struct``: what a struct mask is, args ``[diagonal 0/1, rows, cols, runs]``: whole logical
  rows and columns (lists), the diagonal, and the rest as runs of consecutive logical offsets
  (a list of their boundaries: start, end, start, end, ... strictly increasing, so a partial
  row costs two numbers). Stored as structure rather than as `struct_mask`'s arguments, so a
  file never depends on how that builder fills its budget.
- ``gaps``: the list of all offsets, args ``[first, least, b, bytes]``.
- ``int32``: the offsets as little-endian int32, args ``[]``, where nothing is smaller.

A list of n sorted distinct offsets is ``[n, first, least, b, bytes]`` (``[]`` when empty):
its first offset, then its n - 1 gaps (distance to the previous offset less one, less the
smallest gap `least`), Rice-coded in two bit streams: each gap's low b bits at fixed width,
then its high part in unary. For a uniformly random subset that is log2(1/density) + 1.5 bits
an offset, within a few percent of its entropy; an arithmetic progression takes a bit each.

Every code carries a checksum of the offsets. `decode` checks what it decodes (count, order,
range, checksum) and raises `IndexCodeError` naming the problem; `encode` tries the codes
that apply, smallest first, and returns the first whose decoding is exactly its input.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import sampler
from .masks import rand_mask

CODES = ("rand", "struct", "gaps", "int32")
_ARGS = {"rand": 2, "struct": 4, "gaps": 4, "int32": 0}
_CHECK_DIGITS = 16  # 64 bits of sha256: a regenerated mask that differs is never taken as it
_MAX_OFFSET = 2**31 - 1  # offsets are int32
_MAX_B = 31


class IndexCodeError(ValueError):
    """A layer's index code that is malformed or does not decode to its indices."""


@dataclass(frozen=True)
class IndexCode:
    """One layer's code as the file's layer table holds it: its kind, its args (JSON ints and
    lists, by kind: see the module docstring) and the checksum of the offsets."""

    kind: str
    args: list
    check: str


def checksum(offsets: np.ndarray | torch.Tensor) -> str:
    """The first 16 hex digits of sha256 over the offsets as little-endian int32."""
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(offsets, dtype="<i4")).hexdigest()[:_CHECK_DIGITS]


def _is_int(value: Any) -> bool:
    return type(value) is int and value >= 0


# -- lists: sorted distinct offsets in [0, limit) ---------------------------------------------
def _gap_bytes(gaps: np.ndarray, b: int) -> int:
    k = gaps.size
    return (k * b + 7) // 8 + (int((gaps >> b).sum()) + k + 7) // 8 if k else 0


def _best_b(gaps: np.ndarray) -> int:
    """The b of the fewest bytes (the lowest such b), searched up to one past log2 of the mean
    gap, beyond which the fixed-width part only grows."""
    if gaps.size == 0:
        return 0
    top = min(_MAX_B, (int(gaps.sum()) // gaps.size).bit_length() + 1)
    costs = [_gap_bytes(gaps, b) for b in range(top + 1)]
    return costs.index(min(costs))


def _pack(gaps: np.ndarray, b: int) -> np.ndarray:
    """Each gap's low b bits packed little-endian at fixed width, then each high part in
    unary (that many 0 bits, then a 1), packed little-endian."""
    if gaps.size == 0:
        return np.empty(0, dtype=np.uint8)
    low = np.empty(0, dtype=np.uint8)
    if b:
        low = np.packbits(((gaps[:, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(-1),
                          bitorder="little")
    ones = np.cumsum((gaps >> b) + 1) - 1
    unary = np.zeros(int(ones[-1]) + 1, dtype=np.uint8)
    unary[ones] = 1
    return np.concatenate([low, np.packbits(unary, bitorder="little")])


def _list_code(x: np.ndarray) -> tuple[list[int], Callable[[], np.ndarray]]:
    """The list entry of sorted offsets `x` and the function that packs its bytes."""
    if x.size == 0:
        return [], lambda: np.empty(0, dtype=np.uint8)
    gaps = np.diff(x) - 1
    least = int(gaps.min()) if gaps.size else 0
    gaps = gaps - least
    b = _best_b(gaps)
    return [int(x.size), int(x[0]), least, b, _gap_bytes(gaps, b)], lambda: _pack(gaps, b)


def _list_size(entry: Any, limit: int, what: str) -> int:
    """The bytes of a list entry, after checking that it can describe that many distinct
    offsets below `limit` in that many bytes (before anything is read or allocated)."""
    if entry == []:
        return 0
    if not isinstance(entry, list) or len(entry) != 5 or not all(_is_int(v) for v in entry):
        raise IndexCodeError(f"{what} must be [] or [count, first, least, b, bytes] (ints >= 0), "
                             f"found {entry!r:.80}")
    n, first, least, b, size = entry
    k = n - 1  # the gaps
    span = min(limit, _MAX_OFFSET + 1) - first - n - k * least  # room left for the coded gaps
    if n == 0 or b > _MAX_B or span < 0 or (k == 0 and (least or b)):
        raise IndexCodeError(f"{what}: {n} offsets from {first}, gaps of at least {least} (b={b}), "
                             f"do not fit below {limit}")
    low = (k * b + 7) // 8
    least_bytes, most_bytes = (low + (k + 7) // 8, low + (k + (span >> b) + 7) // 8) if k else (0, 0)
    if not least_bytes <= size <= most_bytes:
        raise IndexCodeError(f"{what}: {size} bytes cannot code {n} offsets below {limit} with b={b} "
                             "(truncated or padded?)")
    return size


def _fixed_width(data: np.ndarray, k: int, b: int) -> np.ndarray:
    """k unsigned b-bit fields packed little-endian (b <= 31), read 5 bytes a field at once."""
    if b == 0:
        return np.zeros(k, dtype=np.int64)
    padded = np.zeros(data.size + 8, dtype=np.uint8)
    padded[: data.size] = data
    start = np.arange(k, dtype=np.int64) * b
    byte, shift = start >> 3, (start & 7).astype(np.uint64)
    word = np.zeros(k, dtype=np.uint64)
    for j in range((b + 14) // 8):  # the bytes a field can span: b bits after up to 7
        word |= padded[byte + j].astype(np.uint64) << np.uint64(8 * j)
    return ((word >> shift) & np.uint64((1 << b) - 1)).astype(np.int64)


def _ones(k: int) -> bytes:
    """k one bits packed little-endian: the unary part of k gaps of high part 0."""
    return b"\xff" * (k // 8) + (bytes([(1 << (k % 8)) - 1]) if k % 8 else b"")


def _list_decode(entry: list, data: np.ndarray, limit: int, what: str) -> np.ndarray:
    """The sorted distinct offsets (int64) of a list entry that `_list_size` has checked, from
    its bytes, all below `limit`."""
    if not entry or entry[4] == 0:
        return np.array(entry[1:2], dtype=np.int64)
    n, first, least, b, size = entry
    if data.size != size:
        raise IndexCodeError(f"{what}: {data.size} bytes where the code says {size}")
    k = n - 1
    if b == 0 and data.tobytes() == _ones(k):  # every gap is `least`: an arithmetic progression
        return first + np.arange(n, dtype=np.int64) * (least + 1)
    split = (k * b + 7) // 8
    if (k * b) % 8 and int(data[split - 1]) >> ((k * b) % 8):
        raise IndexCodeError(f"{what}: stray bits after the last fixed-width field")
    low = _fixed_width(data[:split], k, b)
    ones = np.flatnonzero(np.unpackbits(data[split:], bitorder="little").view(bool))  # bool: 8x faster
    if ones.size != k:
        raise IndexCodeError(f"{what}: the code holds {ones.size + 1} offsets, expected {n}")
    if data.size - split != int(ones[-1]) // 8 + 1:
        raise IndexCodeError(f"{what}: bytes after the last offset")
    # the high parts sum to the zeros before the last one; exact, in Python ints
    last = first + ((int(ones[-1]) + 1 - k) << b) + int(low.sum()) + k * (least + 1)
    if last >= min(limit, _MAX_OFFSET + 1):
        raise IndexCodeError(f"{what}: decoded offset {last} out of range [0, {limit})")
    steps = np.empty(k, dtype=np.int64)  # each gap's high part, then the step to the next offset
    steps[0] = ones[0] + 1
    np.subtract(ones[1:], ones[:-1], out=steps[1:])
    steps -= 1
    steps <<= b
    steps += low
    steps += least + 1
    x = np.empty(n, dtype=np.int64)
    x[0] = first
    np.cumsum(steps, out=x[1:])
    x[1:] += first
    return x


# -- struct: whole logical rows and columns, the diagonal, the rest ----------------------------
def _logical(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def _structure(x: np.ndarray, shape: tuple[int, ...], transposed: bool):
    """(full logical rows, full logical columns, whole diagonal?, the boundaries of the runs of
    the rest's logical offsets r * cols + c) of a 2-D mask; None for a 3-D one."""
    if len(shape) != 2 or x.size == 0:
        return None
    rows, cols = _logical(shape, transposed)
    r, c = (x % rows, x // rows) if transposed else (x // cols, x % cols)
    full_rows = np.flatnonzero(np.bincount(r, minlength=rows) == cols)
    full_cols = np.flatnonzero(np.bincount(c, minlength=cols) == rows)
    diagonal = np.arange(min(rows, cols), dtype=np.int64) * (shape[1] + 1)
    diag = bool((x[np.minimum(np.searchsorted(x, diagonal), x.size - 1)] == diagonal).all())
    row_full, col_full = np.zeros(rows, dtype=bool), np.zeros(cols, dtype=bool)
    row_full[full_rows], col_full[full_cols] = True, True
    covered = row_full[r] | col_full[c] | (diag & (r == c))
    rest = r[~covered] * cols + c[~covered]
    rest = np.sort(rest) if transposed else rest
    if rest.size == 0:
        return full_rows, full_cols, diag, rest
    breaks = np.flatnonzero(np.diff(rest) != 1) + 1  # where a new run starts
    starts = rest[np.concatenate(([0], breaks))]
    ends = rest[np.concatenate((breaks - 1, [rest.size - 1]))] + 1
    return full_rows, full_cols, diag, np.stack([starts, ends], axis=1).ravel()


def _runs(bounds: np.ndarray, nnz: int) -> np.ndarray:
    """The offsets of the runs [start, end) that strictly increasing `bounds` delimit, at most
    nnz of them (checked before any is made)."""
    if bounds.size % 2:
        raise IndexCodeError(f"struct runs: {bounds.size} boundaries, not start/end pairs")
    starts, lengths = bounds[0::2], bounds[1::2] - bounds[0::2]
    total = int(lengths.sum())
    if total > nnz:
        raise IndexCodeError(f"struct runs cover {total} positions, more than the layer's {nnz}")
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)


def _struct_parts(args: list, nnz: int, shape: tuple[int, ...], transposed: bool) -> list[tuple]:
    """(name, list entry, limit, bytes) of each list of a struct code, checked against what the
    layer can hold (no part larger than the mask, so decoding allocates O(nnz))."""
    if len(shape) != 2:
        raise IndexCodeError(f"a struct code needs a 2-D weight, found shape {tuple(shape)}")
    rows, cols = _logical(shape, transposed)
    if rows * cols > _MAX_OFFSET:
        raise IndexCodeError(f"a struct code needs int32 offsets; shape {tuple(shape)} has {rows * cols}")
    if args[0] not in (0, 1) or type(args[0]) is not int or args[0] * min(rows, cols) > nnz:
        raise IndexCodeError(f"struct diagonal must be 0 or 1 (and fit the mask), found {args[0]!r:.40}")
    parts = []
    # (part, values below, at most this many: a line holds rows or cols positions of the mask)
    for (part, limit, most), entry in zip((("rows", rows, nnz // cols), ("cols", cols, nnz // rows),
                                           ("runs", rows * cols + 1, 2 * nnz)), args[1:], strict=True):
        size = _list_size(entry, limit, f"struct {part}")
        if entry and entry[0] > most:
            raise IndexCodeError(f"struct {part}: {entry[0]} entries, a mask of {nnz} has room for {most}")
        parts.append((part, entry, limit, size))
    return parts


def _struct_decode(args: list, parts: list[tuple], data: np.ndarray, nnz: int, shape: tuple[int, ...],
                   transposed: bool) -> np.ndarray:
    rows, cols = _logical(shape, transposed)
    found, at = {}, 0
    for part, entry, limit, size in parts:
        found[part] = _list_decode(entry, data[at: at + size], limit, f"struct {part}")
        at += size
    r_all, c_all = np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64)
    rest = _runs(found["runs"], nnz)
    # each piece comes out sorted, so the stable sort (timsort) only merges a few runs
    line_rows, line_cols = found["rows"], found["cols"]
    if transposed:  # stored (in, out): logical (r, c) sits at c * rows + r
        pieces = [(c_all[:, None] * rows + line_rows[None, :]).ravel() if line_rows.size else line_rows,
                  (line_cols[:, None] * rows + r_all[None, :]).ravel() if line_cols.size else line_cols,
                  np.sort((rest % cols) * rows + rest // cols)]
    else:
        pieces = [(line_rows[:, None] * cols + c_all[None, :]).ravel() if line_rows.size else line_rows,
                  (r_all[:, None] * cols + line_cols[None, :]).ravel() if line_cols.size else line_cols, rest]
    if args[0]:
        pieces.append(np.arange(min(rows, cols), dtype=np.int64) * (shape[1] + 1))
    x = np.sort(np.concatenate(pieces).astype(np.int32), kind="stable")  # int32: below 2^31, checked
    x = sampler.distinct(x)
    if x.size != nnz:
        raise IndexCodeError(f"the structure covers {x.size} positions, the layer holds {nnz}")
    return x


# -- the codes, both ways ------------------------------------------------------------------
def _checked(code: IndexCode, nnz: int, shape: tuple[int, ...], transposed: bool) -> tuple[int, list]:
    """(body bytes, struct parts) of a code after checking its fields; IndexCodeError if any
    is malformed, before anything is read or allocated."""
    kind, args, check = code.kind, code.args, code.check
    if kind not in CODES or not isinstance(args, list) or len(args) != _ARGS[kind]:
        raise IndexCodeError(f"index code must be one of {'/'.join(CODES)} with its args, found "
                             f"{kind!r:.30} {args!r:.60}")
    if not isinstance(check, str) or len(check) != _CHECK_DIGITS or check.strip("0123456789abcdef"):
        raise IndexCodeError(f"check must be {_CHECK_DIGITS} hex digits, found {check!r:.40}")
    numel = math.prod(shape)
    if kind == "rand":
        version, matrices = args
        if type(version) is not int or version != sampler.ALGORITHM:
            raise IndexCodeError(f"rand code of generator version {version!r:.20}; this shira_fx "
                                 f"has version {sampler.ALGORITHM}")
        if (type(matrices) is not int or matrices < 1 or numel > _MAX_OFFSET or numel % matrices
                or nnz % matrices or nnz // matrices > numel // matrices):
            raise IndexCodeError(f"a rand recipe cannot give {nnz} offsets in {matrices!r:.20} blocks "
                                 f"of a weight of shape {shape}")
        return 0, []
    if kind == "int32":
        return 4 * nnz, []
    if kind == "gaps":
        return _list_size([nnz, *args], numel, "gaps"), []
    parts = _struct_parts(args, nnz, shape, transposed)
    return sum(part[3] for part in parts), parts


def code_size(code: IndexCode, nnz: int, shape: tuple[int, ...], transposed: bool) -> int:
    """The body bytes of a code as a file describes it, after checking its fields; raises
    IndexCodeError (a malformed code) before anything is read or allocated."""
    return _checked(code, nnz, shape, transposed)[0]


def decode(code: IndexCode, data: np.ndarray, nnz: int, shape: tuple[int, ...], transposed: bool,
           name: str, seed: int) -> torch.Tensor:
    """The layer's offsets (int64, sorted, unique, in range, matching the checksum) from its
    code and body bytes (uint8); `name` and `seed` are the rand recipe's."""
    size, parts = _checked(code, nnz, shape, transposed)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != size:
        raise IndexCodeError(f"the {code.kind} code takes {size} bytes, found {data.size}")
    numel = math.prod(shape)
    if code.kind == "rand":
        matrices = code.args[1]
        x = rand_mask(numel, nnz // matrices, seed, name, matrices).numpy()
    elif code.kind == "int32":
        x = data.view("<i4")
        if x.size and (x[0] < 0 or x[-1] >= numel or not bool((x[1:] > x[:-1]).all())):
            raise IndexCodeError(f"int32 offsets not sorted, unique and in [0, {numel})")
    elif code.kind == "gaps":
        x = _list_decode([nnz, *code.args], data, numel, "gaps")
    else:
        x = _struct_decode(code.args, parts, data, nnz, shape, transposed)
    if x.size != nnz:
        raise IndexCodeError(f"decoded {x.size} offsets, the layer holds {nnz}")
    if checksum(x) != code.check:
        raise IndexCodeError(
            "the mask regenerated from its recipe (seed, name, count) differs from the one written: "
            "refused rather than guessed" if code.kind == "rand"
            else f"the decoded offsets do not match the checksum (a corrupt {code.kind} code)")
    return torch.from_numpy(x.astype(np.int64, copy=False))


def encode(indices: torch.Tensor, shape: tuple[int, ...], transposed: bool, name: str,
           rand_seed: int | None = None, kinds: tuple[str, ...] = CODES) -> tuple[IndexCode, np.ndarray]:
    """The smallest exact code among `kinds` of a layer's sorted unique offsets, and its body
    bytes. A rand recipe is tried when `rand_seed` is given (the config's mask is rand) and
    taken only if it regenerates these offsets exactly; every choice is decoded back before it
    is taken. Raises ValueError when no code of `kinds` applies."""
    x = indices.detach().cpu().numpy().astype(np.int64)
    numel = math.prod(shape)
    if x.ndim != 1 or (x.size and (x[0] < 0 or x[-1] >= min(numel, _MAX_OFFSET + 1)
                                   or not bool((x[1:] > x[:-1]).all()))):
        raise ValueError(f"{name}: indices must be sorted, unique int32 offsets into shape {shape}")
    check = checksum(x)
    empty = np.empty(0, dtype=np.uint8)
    options: list[tuple[int, IndexCode, Callable[[], np.ndarray]]] = []
    # a rand recipe: one matrix, or (a 3-D parameter) one block per expert
    recipes = sorted({1, shape[0] if len(shape) == 3 else 1})
    if "rand" not in kinds or rand_seed is None or numel > _MAX_OFFSET:
        recipes = []
    for matrices in recipes:  # taken only if it decodes (regenerates) to these offsets, below
        if x.size % matrices == 0:
            options.append((0, IndexCode("rand", [sampler.ALGORITHM, matrices], check), lambda: empty))
    found = _structure(x, shape, transposed) if "struct" in kinds else None
    if found is not None:
        entries, packers = zip(*(_list_code(v) for v in (found[0], found[1], found[3])), strict=True)
        code = IndexCode("struct", [int(found[2]), *entries], check)
        options.append((sum(e[4] for e in entries if e), code,
                        lambda: np.concatenate([pack() for pack in packers])))
    if "gaps" in kinds and x.size:
        entry, pack = _list_code(x)
        options.append((entry[4], IndexCode("gaps", entry[1:], check), pack))
    if "int32" in kinds:
        options.append((4 * x.size, IndexCode("int32", [], check), lambda: x.astype("<i4").view(np.uint8)))
    # what a code adds to the layer table counts too: it is in the file beside the body
    options.sort(key=lambda o: o[0] + len(json.dumps([o[1].kind, o[1].args], separators=(",", ":"))))
    for _, code, build in options:
        data = build()
        try:
            decoded = decode(code, data, x.size, shape, transposed, name, rand_seed or 0)
        except IndexCodeError:
            continue
        if np.array_equal(decoded.numpy(), x):
            return code, data
    raise ValueError(f"{name}: no index code of {kinds} decodes to these indices")  # int32 always does
