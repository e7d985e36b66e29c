"""Autocast for the training ops: x takes the autocast dtype, the weight and the values keep theirs."""

from __future__ import annotations

import torch


def _autocast_kernel(op: str, device_type: str):
    """Autocast for a training op (`sparse_linear`, `sparse_conv`): x is cast to the autocast
    dtype of the moment (bf16 or fp16, whichever the user's autocast region asks for), the
    weight stays as it is (the op casts it), and the values stay fp32 so their gradient is
    accumulated in fp32."""
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def kernel(_keyset, x, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            if x.is_floating_point() and x.device.type == device_type and x.dtype != dtype:
                x = x.to(dtype)
            return getattr(torch.ops.shira_fx, op).default(x, *args)

    return kernel


_LIB = torch.library.Library("shira_fx", "IMPL")


def register_autocast(op: str) -> None:
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        _LIB.impl(op, _autocast_kernel(op, device_type), key, with_keyset=True)
