"""Masks: which elements of each targeted weight a SHiRA adapter trains.

`build_masks` returns, per target, exactly `cfg.budget(out, in)` sorted unique int32 flat
offsets into the weight as stored. The kinds follow the SHiRA paper: rand (a uniform subset,
drawn by the project's own generator so that a file can store it as its recipe),
struct (whole rows at a stride plus the diagonal), wm (top |W|), grad (top accumulated
|dL/dW| over calibration batches) and snip (top |W * dL/dW|). Top-k ties go to the lower
offset, and no kind holds more than one weight-sized score at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import sampler
from .config import ShiraConfig
from .errors import ShiraConfigError
from .targets import TargetLayer

# A block of work (gradient rows, a radix-select pass) holds at most this many elements
# (16 MiB in fp32) and at most 1/_SCRATCH_FRACTION of the weight, so that beside a layer's
# weight-sized score its temporaries stay small.
_SCRATCH_ELEMS = 1 << 22
_SCRATCH_FRACTION = 4
_INT32_MAX = 2**31 - 1

WEIGHT_FREE_MASKS = ("rand", "struct")  # the kinds that need only the weights' shapes
_BAR_DELAY_S = 1.0  # progress bars appear once the work has taken this long

LossFn = Callable[[nn.Module, Any], torch.Tensor]
Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def build_masks(
    model: nn.Module,
    targets: list[TargetLayer],
    cfg: ShiraConfig,
    calib: Iterable | None = None,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The trainable positions of each target: name -> sorted unique int32 flat offsets (CPU).

    grad/snip run `loss_fn(model, batch)` (default: `default_loss`) over `calib` first.
    """
    for t in targets:
        numel = math.prod(t.shape)
        if numel > _INT32_MAX:
            raise ShiraConfigError(
                f"build_masks: the weight of {t.name!r} has {numel} elements; "
                f"int32 flat offsets reach at most {_INT32_MAX}"
            )
    kind = cfg.mask
    pairs: dict[str, Pairs] = {}
    stacked = [t.name for t in targets if t.param != "weight"]
    if kind in ("grad", "snip") and stacked:
        raise ShiraConfigError(
            f"build_masks: mask={kind!r} calibrates on linear layers' inputs and outputs; the 3-D "
            f"parameters {stacked[:3]} take mask='rand', 'struct' or 'wm'"
        )
    if kind in ("grad", "snip"):
        if calib is None:
            raise ShiraConfigError(
                f"build_masks: mask={kind!r} needs calibration data; pass calib=<an iterable of "
                "batches> (and loss_fn=<(model, batch) -> scalar loss> unless model(**batch).loss "
                "is the loss), found calib=None"
            )
        pairs = _calibrate(model, targets, calib, loss_fn or default_loss, kind, progress)
    masks = {}
    # a bar only for work that lasts: tqdm draws nothing before `delay` seconds
    bar = tqdm(targets, desc=f"shira {kind} masks", unit="layer", disable=not progress, delay=_BAR_DELAY_S)
    for t in bar:
        k = cfg.budget(t.out_features, t.in_features)
        if kind == "rand":
            masks[t.name] = rand_mask(math.prod(t.shape), k, cfg.seed, t.name, t.experts)
        elif t.param != "weight":  # stacked experts: a mask over each expert's matrix
            masks[t.name] = _stacked_mask(t, k, cfg)
        elif kind == "struct":
            masks[t.name] = struct_mask(t.out_features, t.in_features, k, cfg.seed, t.transposed)
        elif kind == "wm":
            masks[t.name] = _top_k(_magnitude(t.dense_weight(), t.name), k)
        else:
            masks[t.name] = _top_k(_gradient_score(t, pairs.pop(t.name), kind), k)
    return masks


def _stacked_mask(t: TargetLayer, k: int, cfg: ShiraConfig) -> torch.Tensor:
    """k positions in each expert's (out, in) matrix of a 3-D parameter, as flat offsets into
    the whole parameter (expert e's offsets shifted by e * out * in), sorted."""
    size = t.out_features * t.in_features
    parts = []
    for e in range(t.experts):
        if cfg.mask == "struct":
            local = struct_mask(t.out_features, t.in_features, k, cfg.seed, False)
        else:
            local = _top_k(_magnitude(t.weight[e], f"{t.name}[{e}]"), k)
        parts.append(local.long() + e * size)
    return torch.cat(parts).to(torch.int32)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """`model(**batch).loss` for a mapping batch, `model(batch).loss` otherwise (HF style).

    Tensors in the batch are moved to the device of the model's first parameter.
    """
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        batch = _to_device(batch, device)
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ShiraConfigError(
            f"build_masks: {type(model).__name__} returned a {type(out).__name__} with no loss "
            "(no .loss or ['loss']); pass loss_fn=<(model, batch) -> scalar loss>, or batches "
            "with labels"
        )
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if type(batch) in (list, tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def rand_mask(numel: int, k: int, seed: int, name: str, matrices: int = 1) -> torch.Tensor:
    """The rand mask of a weight of `numel` elements (as stored): k uniformly random distinct
    offsets per matrix, sorted int32. A weight is one matrix, keyed by (seed, name); a 3-D
    parameter of MoE experts stacks `matrices` equal blocks, block e keyed by
    (seed, f"{name}[{e}]") and shifted by its offset. Drawn by `shira_fx.sampler` in O(k)
    memory, the same on every torch release, so an adapter file stores it as this recipe and
    regenerates it bit for bit."""
    if matrices == 1:
        return torch.from_numpy(sampler.sample(numel, k, sampler.key_of(seed, name)))
    size = numel // matrices
    parts = [sampler.sample(size, k, sampler.key_of(seed, f"{name}[{e}]")) + np.int32(e * size)
             for e in range(matrices)]
    return torch.from_numpy(np.concatenate(parts))


def _struct_rows(rows: int, cols: int, k: int, seed: int) -> tuple[int, int, int, int]:
    """(n, f, o, cost): the most rows n at stride f = rows // n from row o = seed % f whose
    union with the diagonal (cost elements) fits k. Needs k >= min(rows, cols)."""
    diag = min(rows, cols)

    def plan(n: int) -> tuple[int, int, int, int]:
        f = rows // n if n else rows
        o = seed % f
        on_diag = min(n, math.ceil((diag - o) / f)) if o < diag else 0
        return n, f, o, n * cols + diag - on_diag

    # cost(n) >= n * cols + diag - min(n, diag); start from the largest n within that bound
    # and walk down (a few steps: the bound is loose by at most diag <= cols elements).
    if k // cols > diag:
        n = k // cols
    else:
        n = min(diag, (k - diag) // (cols - 1)) if cols > 1 else diag
    n = min(rows, n)
    while plan(n)[3] > k:
        n -= 1
    return plan(n)


def struct_mask(rows: int, cols: int, k: int, seed: int, transposed: bool) -> torch.Tensor:
    """Rows at stride plus the diagonal on the logical (out=rows, in=cols) matrix, exactly k
    elements, mapped to flat offsets in the stored layout ((in, out) when transposed).

    n whole rows at stride f = rows // n from row `seed % f` (n the most that fit the budget
    beside the diagonal), so seeds that differ modulo f pick disjoint rows (the paper's
    non-overlapping adapters). A shortfall is topped up column by column from the next row at
    stride; a budget below the diagonal's length takes the first k diagonal elements."""
    diag = min(rows, cols)
    if k <= diag:
        r = c = torch.arange(k)
    else:
        n, f, o, cost = _struct_rows(rows, cols, k, seed)
        chosen = o + f * torch.arange(n)
        d = torch.arange(diag)
        d = d[~((d >= o) & ((d - o) % f == 0) & ((d - o) // f < n))]
        rs = [chosen.repeat_interleave(cols), d]
        cs = [torch.arange(cols).repeat(n), d]
        remaining = k - cost
        taken = torch.zeros(rows, dtype=torch.bool)
        taken[chosen] = True
        order = (o + n * f + torch.arange(rows)) % rows
        for row in order[~taken[order]].tolist():
            if remaining == 0:
                break
            col = torch.arange(cols)
            col = col[col != row][:remaining]
            rs.append(torch.full_like(col, row))
            cs.append(col)
            remaining -= col.numel()
        r, c = torch.cat(rs), torch.cat(cs)
    flat = c * rows + r if transposed else r * cols + c
    return flat.sort().values.to(torch.int32)


def _score_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.promote_types(w.dtype, torch.float32)


def _magnitude(weight: torch.Tensor, name: str) -> torch.Tensor:
    """|W| in fp32 (fp64 for fp64 weights): one weight-sized tensor, whatever the weight dtype."""
    w = weight.detach()
    score = w.to(_score_dtype(w), copy=True).abs_()
    if not torch.isfinite(score.max()):  # a NaN or inf shows in the max of |W|
        raise ShiraConfigError(f"build_masks: mask='wm': the weight of {name!r} is not finite")
    return score


def _top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat offsets of the k largest scores (finite, >= 0), ties to the lower offset, sorted,
    int32 on CPU."""
    flat = score.reshape(-1)
    if k >= flat.numel():
        return torch.arange(flat.numel(), dtype=torch.int32)
    kth = _kth_largest(flat, k)
    above = (flat > kth).nonzero().view(-1)
    tied = (flat == kth).nonzero().view(-1)[: k - above.numel()]
    return torch.cat([above, tied]).sort().values.to(device="cpu", dtype=torch.int32)


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a finite non-negative fp32/fp64 vector, by radix select on its bits
    (their integer order is the float order), 8 bits a pass, a quarter of the vector a block.

    CPU `torch.topk` keeps a hidden (value, int64 index) pair per element (four fp32 weights)
    and `kthvalue` a hidden copy; this needs only block-sized temporaries and is faster.
    """
    bits = flat.view(torch.int32 if flat.element_size() == 4 else torch.int64)
    width = 8 * flat.element_size() - 1  # the sign bit is 0
    step = min(_SCRATCH_ELEMS, -(-bits.numel() // _SCRATCH_FRACTION))
    prefix, need, done = 0, k, 0  # bits found so far; rank of the k-th among those with them
    while done < width:
        d = min(8, width - done)
        shift = width - done - d
        hist = torch.zeros(1 << d, dtype=torch.int64, device=flat.device)
        for i in range(0, bits.numel(), step):
            block = bits[i : i + step]
            if done:
                block = block[(block >> (shift + d)) == prefix]
            hist += torch.bincount((block >> shift) & ((1 << d) - 1), minlength=1 << d)
        at_or_above = hist.flip(0).cumsum(0).flip(0)
        digit = int((at_or_above >= need).nonzero().max())
        need -= int(at_or_above[digit] - hist[digit])
        prefix, done = (prefix << d) | digit, done + d
    return torch.tensor(prefix, dtype=bits.dtype, device=flat.device).view(flat.dtype)


def _calibrate(
    model: nn.Module,
    targets: list[TargetLayer],
    calib: Iterable,
    loss_fn: LossFn,
    kind: str,
    progress: bool,
) -> dict[str, Pairs]:
    """Per target, one (x, dL/dy) pair per calibration batch that reached it: the module's
    input (tokens, in) and the loss gradient at its output (tokens, out).

    Forward hooks record each targeted module's input and output; only the targeted weights
    require grad, and `torch.autograd.grad(loss, outputs)` runs no AccumulateGrad, so no dense
    `.grad` is ever formed. The pairs are never weight-sized but add up over batches (about
    what a frozen backward saves, per batch): keep the calibration set small. Every
    requires_grad flag is restored and every hook removed on the way out, even on error."""
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    flags.update({id(t.weight): (t.weight, t.weight.requires_grad) for t in targets if not t.quantized})
    # a quantized weight cannot require grad: its output gets a zero that does, so dL/dy exists
    probe = torch.zeros((), requires_grad=True)
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (target, x, y) in this batch

    def recorder(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
            x = args[0] if args else next(iter(kwargs.values()))
            if targets[i].quantized:
                out = out + probe.to(out.dtype)
            calls.append((i, x.detach(), out))
            return out if targets[i].quantized else None

        return hook

    pairs: dict[str, Pairs] = {t.name: [] for t in targets}
    handles = []
    batches = 0
    try:
        for p, _ in flags.values():
            p.requires_grad_(False)
        for t in targets:
            if not t.quantized:
                t.weight.requires_grad_(True)
        handles = [
            t.module.register_forward_hook(recorder(i), with_kwargs=True)
            for i, t in enumerate(targets)
        ]
        with torch.enable_grad():
            bar = tqdm(calib, desc=f"shira {kind} calibration", unit="batch", disable=not progress,
                       delay=_BAR_DELAY_S)
            for b, batch in enumerate(bar):
                calls.clear()
                loss = _checked_loss(loss_fn(model, batch), kind, b)
                used = [(i, x, y) for i, x, y in calls if y.requires_grad]
                if not used or not loss.requires_grad:
                    raise ShiraConfigError(
                        f"build_masks: mask={kind!r}: the loss of calibration batch {b} does not "
                        "depend on any targeted layer"
                    )
                grads = torch.autograd.grad(loss, [y for _, _, y in used], allow_unused=True)
                per_target: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
                for (i, x, _), gy in zip(used, grads, strict=True):
                    if gy is None:
                        continue
                    t = targets[i]
                    if not torch.isfinite(gy).all():
                        raise ShiraConfigError(
                            f"build_masks: mask={kind!r}: the loss gradient at the output of "
                            f"{t.name!r} is not finite in calibration batch {b}"
                        )
                    # a convolution keeps its input and output gradient as they are
                    xy = (x, gy) if t.conv else (x.reshape(-1, t.in_features), gy.reshape(-1, t.out_features))
                    per_target.setdefault(i, []).append(xy)
                for i, xys in per_target.items():
                    xs, gys = zip(*xys, strict=True)
                    pairs[targets[i].name].append((torch.cat(xs), torch.cat(gys)))
                batches += 1
    finally:
        calls.clear()
        for h in handles:
            h.remove()
        for p, flag in flags.values():
            p.requires_grad_(flag)
    if batches == 0:
        raise ShiraConfigError(
            f"build_masks: mask={kind!r} needs calibration data; calib yielded no batch "
            "(pass a non-empty iterable of batches)"
        )
    return pairs


def _checked_loss(loss: Any, kind: str, b: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        found = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ShiraConfigError(
            f"build_masks: mask={kind!r}: loss_fn must return a scalar tensor, found {found} "
            f"for calibration batch {b}"
        )
    if not torch.isfinite(loss).all():
        raise ShiraConfigError(
            f"build_masks: mask={kind!r}: the loss of calibration batch {b} is {loss.item()}"
        )
    return loss.reshape(())


def _gradient_score(t: TargetLayer, pairs: Pairs, kind: str) -> torch.Tensor:
    """sum_b |dW_b| in the stored layout (times |W| for snip): one fp32 weight-sized score,
    with dW_b = dy^T x (Linear) or x^T dy (Conv1D) formed a block of rows at a time in a
    scratch buffer of at most a quarter of the weight."""
    if not pairs:
        raise ShiraConfigError(
            f"build_masks: mask={kind!r}: {t.name!r} did not reach the loss in any calibration "
            "batch, so it has no gradient statistic"
        )
    w = t.dense_weight().detach()
    dtype = _score_dtype(w)
    if t.conv:
        return _conv_gradient_score(t, w, pairs, kind, dtype)
    rows, cols = w.shape
    step = max(1, min(-(-rows // _SCRATCH_FRACTION), _SCRATCH_ELEMS // cols))
    score = torch.zeros(rows, cols, dtype=dtype, device=w.device)
    scratch = torch.empty(step * cols, dtype=dtype, device=w.device)
    while pairs:
        x, gy = pairs.pop()
        # dW = a^T b: (out, in) = gy^T x for Linear, (in, out) = x^T gy for Conv1D.
        a, b = (x, gy) if t.transposed else (gy, x)
        a, b = a.to(dtype), b.to(dtype)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
            torch.mm(a[:, r0:r1].T, b, out=block)
            score[r0:r1].add_(block.abs_())
    del scratch
    if kind == "snip":
        for r0 in range(0, rows, step):
            score[r0 : r0 + step].mul_(w[r0 : r0 + step].to(dtype).abs())
    if not torch.isfinite(score.max()):  # a NaN or inf shows in the max of a sum of |.|
        raise ShiraConfigError(
            f"build_masks: mask={kind!r}: the gradient statistic of {t.name!r} is not finite"
        )
    return score


def _conv_gradient_score(t: TargetLayer, w: torch.Tensor, pairs: Pairs, kind: str,
                         dtype: torch.dtype) -> torch.Tensor:
    """`_gradient_score` of a convolution: each batch's weight gradient (the convolution's own,
    weight-sized, one at a time), |.| summed (times |W| for snip)."""
    m = t.module
    score = torch.zeros(w.shape, dtype=dtype, device=w.device)
    while pairs:
        x, gy = pairs.pop()
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = torch.nn.functional.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = [0] * (w.dim() - 2)
        else:
            padding = list(m.padding)
        grad_w = torch.ops.aten.convolution_backward(
            gy.to(dtype), x.to(dtype), w.to(dtype), None, list(m.stride), padding, list(m.dilation), False,
            [0] * (w.dim() - 2), m.groups, [False, True, False])[1]
        score.add_(grad_w.abs_())
    if kind == "snip":
        score.mul_(w.to(dtype).abs())
    if not torch.isfinite(score.max()):
        raise ShiraConfigError(f"build_masks: mask={kind!r}: the gradient statistic of {t.name!r} is "
                               "not finite")
    return score
