"""The layer's own dense linear, as `sparse_linear` and a mixed batch's CPU linear run it."""

import torch.nn.functional as F
from torch import Tensor


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """The linear in x's dtype (under autocast x arrives already cast; the weight is cast
    here, so backward keeps the weight itself, not a cast copy); `transposed`: a weight stored
    (in, out), as GPT-2's Conv1D stores it."""
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if not transposed:
        return F.linear(x, weight, bias)
    y = x.reshape(-1, x.shape[-1]) @ weight
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[1])
