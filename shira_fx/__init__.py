"""shira_fx: Sparse High Rank Adapters as a torch.compile feature."""

from .adapter import ShiraLayer, SparseAdapter, prepare
from .backend import ShiraBackend, backend, explain
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError, ShiraError, ShiraTrainingError
from .train import train_step

__all__ = [
    "ShiraConfig",
    "ShiraLayer",
    "SparseAdapter",
    "ShiraBackend",
    "prepare",
    "backend",
    "explain",
    "train_step",
    "ShiraAdapterError",
    "ShiraConfigError",
    "ShiraError",
    "ShiraTrainingError",
]
