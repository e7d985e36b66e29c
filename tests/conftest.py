import os

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, so this must run before
# any test module imports shira_fx.kernels; without a GPU the kernels then run on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
