"""Find the linear layers a `ShiraConfig` targets and how each stores its weight.

nn.Linear stores W as (out, in) and computes x @ W.T; transformers' GPT-2 `Conv1D` stores
W as (in, out) and computes x @ W. Indices are always flat offsets into W *as stored*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import ShiraConfig
from .errors import ShiraConfigError

# Last name components that mark an output head (never targeted by default).
HEAD_NAMES = frozenset(
    {"lm_head", "classifier", "score", "head", "qa_outputs", "decoder", "output_projection"}
)


@dataclass(frozen=True)
class TargetLayer:
    """A targeted module: its qualified name, the module, and the layout of its weight."""

    name: str
    module: nn.Module
    transposed: bool  # True when the weight is stored (in, out), as in GPT-2's Conv1D

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def out_features(self) -> int:
        return self.weight.shape[0 if not self.transposed else 1]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1 if not self.transposed else 0]


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight (in, out): transformers' GPT-2 `Conv1D`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' Conv1D with a 2-D weight."""
    if isinstance(module, nn.Linear) or is_transposed(module):
        w = getattr(module, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 2
    return False


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _output_head_ids(model: nn.Module) -> set[int]:
    """Modules that produce the model's output (HF `get_output_embeddings`, weights tied to an
    embedding, or a head-like name): fine-tuning them is not what an adapter is for."""
    ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (AttributeError, RuntimeError):  # models without an output embedding
            out = None
        if isinstance(out, nn.Module):
            ids.add(id(out))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if not is_linear_like(m):
            continue
        if id(m.weight) in embedding_weights or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            ids.add(id(m))
    return ids


def find_targets(model: nn.Module, cfg: ShiraConfig) -> list[TargetLayer]:
    """The linear layers of `model` that `cfg` targets, in module order.

    Raises ShiraConfigError when nothing matches, or when a name in the list matches no module
    or matches a module that is not linear (so a typo never silently trains nothing).
    """
    tm = cfg.target_modules
    named = list(model.named_modules())
    heads = _output_head_ids(model) if tm is None else set()
    found: list[TargetLayer] = []
    used_patterns: set[str] = set()
    for name, m in named:
        if not name or any(_name_matches(name, ex) for ex in cfg.exclude_modules):
            continue
        if tm is None:
            hit = is_linear_like(m) and id(m) not in heads
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            pats = [p for p in tm if _name_matches(name, p)]
            used_patterns.update(pats)
            hit = bool(pats)
        if not hit:
            continue
        if not is_linear_like(m):
            if tm is None:
                continue
            if hasattr(m, "base_layer"):  # a PEFT tuner layer (LoRA, ...) wrapping the linear
                raise ShiraConfigError(
                    f"ShiraConfig.target_modules matches {name!r}, a PEFT {type(m).__name__} layer: "
                    "this model is wrapped by PEFT; prepare the base model before "
                    "peft.get_peft_model, or merge the PEFT adapter first (merge_and_unload())"
                )
            raise ShiraConfigError(
                f"ShiraConfig.target_modules matches {name!r}, a {type(m).__name__}; only "
                "nn.Linear and transformers Conv1D layers can carry a SHiRA adapter"
            )
        found.append(TargetLayer(name, m, transposed=is_transposed(m)))
    if isinstance(tm, list):
        missing = [p for p in tm if p not in used_patterns]
        if missing:
            raise ShiraConfigError(
                f"ShiraConfig.target_modules: no module of {type(model).__name__} is named "
                f"{missing} (names are matched exactly or as a dotted suffix)"
            )
    if not found:
        raise ShiraConfigError(
            f"ShiraConfig.target_modules={tm!r} matches no linear layer of {type(model).__name__}"
        )
    return found
