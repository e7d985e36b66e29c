"""shira_fx: Sparse High Rank Adapters as a torch.compile feature."""

from .config import ShiraConfig
from .errors import ShiraAdapterError, ShiraConfigError, ShiraError, ShiraTrainingError

__all__ = [
    "ShiraConfig",
    "ShiraAdapterError",
    "ShiraConfigError",
    "ShiraError",
    "ShiraTrainingError",
]
