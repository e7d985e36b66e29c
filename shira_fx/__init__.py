"""shira_fx: Sparse High Rank Adapters as a torch.compile feature."""

from .adapter import SparseAdapter, prepare
from .adapter_files import StoredAdapter, load_adapter
from .checkpoint import load_checkpoint, save_checkpoint
from .compile.backend import ShiraBackend, backend, explain
from .compile.check import verify
from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError, ShiraError, ShiraTrainingError, ShiraWarning
from .layer import ShiraLayer
from .serve.bank import AdapterBank
from .serve.export import export_dense
from .train import train_step

__all__ = [
    "ShiraConfig",
    "ShiraLayer",
    "SparseAdapter",
    "ShiraBackend",
    "prepare",
    "AdapterBank",
    "export_dense",
    "StoredAdapter",
    "load_adapter",
    "backend",
    "explain",
    "verify",
    "train_step",
    "save_checkpoint",
    "load_checkpoint",
    "ShiraAdapterError",
    "ShiraConfigError",
    "ShiraError",
    "ShiraTrainingError",
    "ShiraWarning",
]
