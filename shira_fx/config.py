"""`ShiraConfig`: which linear layers get a sparse adapter, how many elements, and which mask."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ShiraConfigError

MASK_KINDS = ("rand", "struct", "wm", "grad", "snip")
VALUE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class ShiraConfig:
    """Configuration of a SHiRA adapter; every field is checked when the config is built."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact, or a dotted suffix like 'q_proj') or one regex matched "
            "against the full qualified name. None: every linear layer except output heads."
        },
    )
    density: float | None = field(
        default=None,
        metadata={"help": "Fraction of each weight that is trainable, in (0, 1]. Default 0.01."},
    )
    r: int | None = field(
        default=None,
        metadata={
            "help": "PEFT-compatible budget: r*(out+in) elements per weight (LoRA rank r's "
            "parameter count). Mutually exclusive with density."
        },
    )
    mask: str = field(
        default="rand",
        metadata={"help": "Mask kind: rand | struct | wm | grad | snip (grad/snip need calib)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the rand mask (and struct offset)."})
    values_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the trainable values (master copy), also for bf16/fp16 weights."},
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names (exact or dotted suffix) of 3-D parameters to adapt as well, e.g. "
            "['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'] (MoE experts, as PEFT's "
            "LoraConfig.target_parameters): a mask over each expert's matrix."
        },
    )
    exclude_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Names (exact or dotted suffix) never targeted, even if matched."},
    )

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ShiraConfigError(f"ShiraConfig.target_modules: invalid regex {tm!r}: {e}") from e
        elif tm is not None:
            if isinstance(tm, tuple | set):
                tm = self.target_modules = sorted(tm) if isinstance(tm, set) else list(tm)
            if not isinstance(tm, list) or not tm or not all(isinstance(n, str) and n for n in tm):
                raise ShiraConfigError(
                    "ShiraConfig.target_modules: expected None, a regex string or a non-empty "
                    f"list of module names, found {tm!r}"
                )
        tp = self.target_parameters
        if tp is not None:
            if isinstance(tp, tuple | set):
                tp = self.target_parameters = sorted(tp) if isinstance(tp, set) else list(tp)
            if not isinstance(tp, list) or not tp or not all(isinstance(n, str) and n for n in tp):
                raise ShiraConfigError(
                    f"ShiraConfig.target_parameters: expected None or a non-empty list of parameter "
                    f"names, found {tp!r}"
                )
        if not isinstance(self.exclude_modules, list | tuple) or not all(
            isinstance(n, str) for n in self.exclude_modules
        ):
            raise ShiraConfigError(
                f"ShiraConfig.exclude_modules: expected a list of names, found {self.exclude_modules!r}"
            )
        self.exclude_modules = list(self.exclude_modules)
        if self.density is not None and self.r is not None:
            raise ShiraConfigError(
                f"ShiraConfig: give density or r, not both (found density={self.density}, r={self.r})"
            )
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
                raise ShiraConfigError(f"ShiraConfig.r: expected a positive int, found {self.r!r}")
        else:
            if self.density is None:
                self.density = 0.01
            d = self.density
            if isinstance(d, bool) or not isinstance(d, int | float) or not (0.0 < d <= 1.0):
                raise ShiraConfigError(f"ShiraConfig.density: expected a float in (0, 1], found {d!r}")
            self.density = float(d)
        if self.mask not in MASK_KINDS:
            raise ShiraConfigError(
                f"ShiraConfig.mask: expected one of {', '.join(MASK_KINDS)}, found {self.mask!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ShiraConfigError(f"ShiraConfig.seed: expected an int, found {self.seed!r}")
        if isinstance(self.values_dtype, torch.dtype):
            self.values_dtype = str(self.values_dtype).removeprefix("torch.")
        if self.values_dtype not in VALUE_DTYPES:
            raise ShiraConfigError(
                f"ShiraConfig.values_dtype: expected one of {', '.join(VALUE_DTYPES)}, "
                f"found {self.values_dtype!r}"
            )

    @property
    def torch_values_dtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.values_dtype]

    def budget(self, out_features: int, in_features: int) -> int:
        """Number of trainable elements for a weight of shape (out, in): at least 1, at most all."""
        numel = out_features * in_features
        if self.r is not None:
            k = self.r * (out_features + in_features)
        else:
            k = round(self.density * numel)
        return max(1, min(numel, k))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShiraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShiraConfigError(f"ShiraConfig: unknown fields {unknown}")
        return cls(**d)
