"""Find the layers a `ShiraConfig` targets and how each stores its weight.

nn.Linear stores W as (out, in) and computes x @ W.T; transformers' GPT-2 `Conv1D` stores
W as (in, out) and computes x @ W; nn.Conv1d / nn.Conv2d store (out, in / groups, *kernel),
adapted as the (out, in / groups * kernel) matrix that view is. Indices are always flat
offsets into W *as stored*. Default targets are linears; convolutions are adapted when named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import quantized
from .config import ShiraConfig
from .errors import ShiraConfigError

# What a style adapter of a diffusion model trains (`ShiraConfig(target_modules=...)`): in a
# UNet (SD 1.5, SDXL) its attention projections, feed-forwards and resnet convolutions; in a
# diffusion transformer (SD3, Flux) its joint attention's projections and feed-forwards.
DIFFUSION_TARGETS = {
    "unet": r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|resnets\.\d+\.conv[12])$",
    "transformer": r".*(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                   r"|ff(_context)?\.net\.(0\.proj|2)|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))$",
}

# Last name components that mark an output head of a model that is not a transformers model
# (never targeted by default there).
HEAD_NAMES = frozenset(
    {"lm_head", "classifier", "score", "head", "qa_outputs", "decoder", "output_projection"}
)


@dataclass(frozen=True)
class TargetLayer:
    """A targeted weight: its qualified name, its module, the layout of its weight, and which
    parameter of the module it is ("weight" for a linear; e.g. "gate_up_proj" for a 3-D
    parameter of MoE experts, one (out, in) matrix per expert, named by the parameter)."""

    name: str
    module: nn.Module
    transposed: bool  # True when the weight is stored (in, out), as in GPT-2's Conv1D
    param: str = "weight"
    quantized: str | None = None  # the kind of a quantized base (shira_fx.quantized)

    @property
    def weight(self) -> torch.Tensor:
        return self.module._parameters[self.param]

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape as the adapter addresses it (a quantized weight's logical one)."""
        if self.quantized:
            return quantized.logical_shape(self.module)
        return tuple(self.weight.shape)

    def dense_weight(self) -> torch.Tensor:
        """The weight as floats (a quantized one dequantized: one layer at a time)."""
        return quantized.dequantized_weight(self.module) if self.quantized else self.weight

    @property
    def conv(self) -> bool:
        """A convolution's weight (Conv1d, Conv2d)."""
        return self.param == "weight" and is_conv(self.module)

    @property
    def experts(self) -> int:
        """How many (out, in) matrices the weight stacks (1 for a linear)."""
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def out_features(self) -> int:
        if self.conv:
            return self.shape[0]
        return self.shape[-2 if not self.transposed else -1]

    @property
    def in_features(self) -> int:
        """A convolution's fan-in: in / groups times the kernel."""
        if self.conv:
            return math.prod(self.shape[1:])
        return self.shape[-1 if not self.transposed else -2]


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores its weight (in, out): transformers' GPT-2 `Conv1D`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_conv(module: nn.Module) -> bool:
    """nn.Conv1d or nn.Conv2d (and subclasses: diffusers' LoRACompatibleConv) with its weight."""
    return isinstance(module, nn.Conv1d | nn.Conv2d) and isinstance(_weight(module), torch.Tensor)


def is_adaptable(module: nn.Module) -> bool:
    """A layer whose weight can carry a SHiRA adapter: linear-like or a 1-D/2-D convolution."""
    return is_linear_like(module) or is_conv(module)


def _weight(module: nn.Module) -> object:
    return module._parameters.get("weight")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' Conv1D with a 2-D weight."""
    if isinstance(module, nn.Linear) or is_transposed(module):
        w = _weight(module)
        return isinstance(w, torch.Tensor) and w.dim() == 2
    return False


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _left_out_by_default(model: nn.Module) -> set[int]:
    """The modules default targets leave out, by what they are (fine-tuning them is not what
    an adapter is for): the model's output embedding, any linear whose weight is tied to an
    embedding, poolers (a class named `*Pooler` or `*PoolingHead`) and, in a transformers
    model, the task head: every module outside its base model (`lm_head`, `classifier`,
    `score`, `qa_outputs`, ...). A model that is not a transformers model has no base model
    to tell its head apart, so there a module named like a head (HEAD_NAMES) is left out."""
    ids = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (AttributeError, RuntimeError):  # models without an output embedding
            out = None
        if isinstance(out, nn.Module):
            ids.add(id(out))
    base = getattr(model, "base_model", None)
    transformers_model = isinstance(base, nn.Module) and hasattr(model, "config")
    inside_base = {id(m) for m in base.modules()} if transformers_model else None
    embedding_weights = {id(_weight(m)) for m in model.modules() if isinstance(m, nn.Embedding)}
    poolers = [name for name, m in model.named_modules()
               if type(m).__name__.endswith(("Pooler", "PoolingHead"))]
    for name, m in model.named_modules():
        if not is_linear_like(m):
            continue
        head = (id(m) not in inside_base) if transformers_model else name.rsplit(".", 1)[-1] in HEAD_NAMES
        pooled = any(name == p or name.startswith(p + ".") for p in poolers)
        if id(_weight(m)) in embedding_weights or head or pooled:
            ids.add(id(m))
    return ids


def find_targets(model: nn.Module, cfg: ShiraConfig) -> list[TargetLayer]:
    """The linear layers of `model` that `cfg` targets, in module order.

    Raises ShiraConfigError when nothing matches, or when a name in the list matches no module
    or matches a module that is not linear (so a typo never silently trains nothing).
    """
    tm = cfg.target_modules
    named = list(model.named_modules())
    heads = _left_out_by_default(model) if tm is None else set()
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
        if not (is_linear_like(m) if tm is None else is_adaptable(m)):
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
                "nn.Linear, transformers Conv1D, nn.Conv1d and nn.Conv2d layers can carry a SHiRA "
                "adapter"
            )
        found.append(TargetLayer(name, m, transposed=is_transposed(m),
                                 quantized=quantized.quantized_kind(m)))
    if isinstance(tm, list):
        missing = [p for p in tm if p not in used_patterns]
        if missing:
            raise ShiraConfigError(
                f"ShiraConfig.target_modules: no module of {type(model).__name__} is named "
                f"{missing} (names are matched exactly or as a dotted suffix)"
            )
    found += _parameter_targets(model, cfg)
    if not found:
        raise ShiraConfigError(
            f"ShiraConfig.target_modules={tm!r} matches no linear layer of {type(model).__name__}"
        )
    return found


def _parameter_targets(model: nn.Module, cfg: ShiraConfig) -> list[TargetLayer]:
    """The 3-D parameters `cfg.target_parameters` names (exactly or as a dotted suffix)."""
    if not cfg.target_parameters:
        return []
    modules = dict(model.named_modules())
    found, used = [], set()
    for name, p in model.named_parameters():
        pats = [pat for pat in cfg.target_parameters if _name_matches(name, pat)]
        if not pats or any(_name_matches(name.rpartition(".")[0], ex) for ex in cfg.exclude_modules):
            continue
        used.update(pats)
        if p.dim() != 3:
            raise ShiraConfigError(
                f"ShiraConfig.target_parameters matches {name!r} of shape {tuple(p.shape)}; expected a "
                "3-D (experts, out, in) parameter (2-D weights of linears go in target_modules)"
            )
        owner, _, attr = name.rpartition(".")
        found.append(TargetLayer(name, modules[owner], transposed=False, param=attr))
    missing = [pat for pat in cfg.target_parameters if pat not in used]
    if missing:
        raise ShiraConfigError(
            f"ShiraConfig.target_parameters: no parameter of {type(model).__name__} is named {missing} "
            "(names are matched exactly or as a dotted suffix)"
        )
    return found


def resolve_weight(model: nn.Module, name: str) -> tuple[torch.Tensor, bool] | None:
    """(weight, transposed) of the layer an adapter names: a linear-like module's weight, or a
    3-D parameter named in full; None when the model has no such layer (or a quantized one:
    see `resolve_layer`)."""
    found = resolve_layer(model, name)
    return None if found is None or found.quantized else (found.weight, found.transposed)


def resolve_layer(model: nn.Module, name: str,
                  modules: Mapping[str, nn.Module] | None = None) -> TargetLayer | None:
    """The layer an adapter names, as a TargetLayer: a linear-like module (quantized or not)
    or a 3-D parameter named in full; None when the model has no such layer. `modules`:
    `dict(model.named_modules())`, for callers that resolve many names (one walk, not one
    a name)."""
    modules = dict(model.named_modules()) if modules is None else modules
    module = modules.get(name)
    if name and module is not None and is_adaptable(module):
        return TargetLayer(name, module, is_transposed(module), quantized=quantized.quantized_kind(module))
    owner, _, attr = name.rpartition(".")
    module = modules.get(owner)
    if module is not None and attr in module._parameters:
        p = module._parameters[attr]
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            return TargetLayer(name, module, False, param=attr)
    return None
