"""The torch.compile backend: the SHiRA pass, then an inner compiler (Inductor by default).

`torch.compile(model, backend=shira_fx.backend())` or, by its registered name,
`torch.compile(model, backend="shira_fx")`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomPartitionerFn, get_hash_for_files

from .. import registry
from ..errors import ShiraConfigError
from . import recompute as recompute_pass
from . import report as report_module
from .recompute import tag_sparse_linear_inputs
from .report import RewriteReport, record_partition
from .rewrite import rewrite_sparse_linears
from .verify import FirstCallVerified, draws_random, hint, holds_convolutions, tolerance

log = logging.getLogger("shira_fx")

# Under gradient checkpointing Dynamo refuses a forward's side effect on an object from outside
# the checkpointed region (it would have to replay it in the recomputation) and runs the whole
# region eagerly. transformers' `kernels` package makes one in every attention block (it sets
# and resets a context variable, undoing itself), so without this every checkpointed block of
# a transformers model would run uncompiled. Not replaying such a side effect in the
# recomputation is exact for it; README ("Gradient checkpointing") says how to turn it off.
torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
# Inductor caches a custom pass by a hash of the files that define it
_PASS_FILES = (recompute_pass.__file__, report_module.__file__)


class _TagInputsPass(CustomGraphPass):
    """Inductor joint-graph hook running `tag_sparse_linear_inputs`; counts what it tagged."""

    def __init__(self, report: RewriteReport):
        self.report = report

    def __call__(self, graph: fx.Graph) -> None:
        self.report.recomputed += tag_sparse_linear_inputs(graph)

    def uuid(self):
        return get_hash_for_files(_PASS_FILES)


def _min_cut_and_record(report: RewriteReport, joint: fx.GraphModule, inputs, **kwargs):
    """Inductor's (and our aot_eager's) partitioner, then the memory report read off it."""
    from functorch.compile import min_cut_rematerialization_partition

    forward, backward = min_cut_rematerialization_partition(joint, inputs, **kwargs)
    record_partition(report, joint, backward, kwargs.get("static_lifetime_input_indices"))
    return forward, backward


class _RecordingPartitioner(CustomPartitionerFn):
    """Inductor's default min-cut partitioner, recording what it kept into the report."""

    def __init__(self, report: RewriteReport):
        self.report = report

    def __call__(self, gm: fx.GraphModule, joint_inputs, **kwargs):
        return _min_cut_and_record(self.report, gm, joint_inputs, **kwargs)

    def uuid(self):
        return get_hash_for_files(_PASS_FILES)


def _aot_eager_with_recompute(report: RewriteReport) -> Callable:
    """aot_eager, but with the min-cut partitioner after tagging (aot_eager's default
    partitioner saves every forward value backward uses and would ignore the tags)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def partition(joint, inputs, **kwargs):
        report.recomputed += tag_sparse_linear_inputs(joint.graph)
        return _min_cut_and_record(report, joint, inputs, **kwargs)

    def boxed(gm, _inputs):
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition)


def _inductor_options(mode: str | None, options: dict | None) -> dict:
    """Inductor config patches for torch.compile's `mode` and `options`."""
    from torch._inductor import list_mode_options

    if mode not in (None, "default") and mode not in list_mode_options():
        raise ShiraConfigError(f"torch.compile: unknown mode {mode!r}; expected one of "
                               f"{', '.join(list_mode_options())}")
    return {**(list_mode_options(mode) if mode else {}), **(options or {})}


class ShiraBackend:
    """A torch.compile backend: rewrite prepared linears, then hand the graph to `inner`
    ("inductor", "aot_eager", "eager", any registered backend name, or a backend callable).
    With `recompute="auto"` (inductor, aot_eager) the input x of each rewritten linear is
    rebuilt in backward instead of saved; `memory_budget` passes through to
    `torch._functorch.config.activation_memory_budget` for this backend's compiles only.
    `verify` (default "auto": on unless `inner` is the reference itself, aot_eager or eager)
    checks, on the first call of each training graph, the values' gradients it computes
    against aot_eager's, and refuses a graph that gets them wrong (compile/verify.py).
    `reports` keeps one RewriteReport per compiled graph, in compile order."""

    def __init__(self, inner: str | Callable = "inductor", recompute: str = "auto",
                 memory_budget: float | None = None, verify: bool | str = "auto"):
        if recompute not in ("auto", "off"):
            raise ValueError(f"backend: recompute must be 'auto' or 'off', found {recompute!r}")
        if memory_budget is not None and not 0.0 <= memory_budget <= 1.0:
            raise ValueError(f"backend: memory_budget must be in [0, 1], found {memory_budget!r}")
        if verify not in ("auto", True, False):
            raise ValueError(f"backend: verify must be 'auto', True or False, found {verify!r}")
        self.inner = inner
        self.recompute = recompute
        self.memory_budget = memory_budget
        self.verify = (inner not in ("aot_eager", "eager")) if verify == "auto" else verify
        self.reports: list[RewriteReport] = []

    def _compile(self, gm: fx.GraphModule, example_inputs: list, report: RewriteReport,
                 inductor_options: dict) -> Callable:
        tag = self.recompute == "auto" and bool(report.rewritten)
        if callable(self.inner):
            return self.inner(gm, example_inputs)
        report.recompute = tag and self.inner in ("inductor", "aot_eager")
        if self.inner == "inductor":
            from torch._inductor import config as inductor_config
            from torch._inductor.compile_fx import compile_fx

            hook = _TagInputsPass(report) if tag else None
            partitioner = _RecordingPartitioner(report) if report.rewritten else None
            with inductor_config.patch(joint_custom_pre_pass=hook, custom_partitioner_fn=partitioner,
                                       **inductor_options):
                return compile_fx(gm, example_inputs)
        if self.inner == "aot_eager" and self.recompute == "auto":
            # min-cut for every graph, as Inductor partitions: graphs without a prepared layer
            # (a checkpointed model's embedding and head) then hold what Inductor's would
            return _aot_eager_with_recompute(report)(gm, example_inputs)
        return torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)

    def __call__(self, gm: fx.GraphModule, example_inputs: list, mode: str | None = None,
                 options: dict | None = None) -> Callable:
        """Compile one Dynamo graph; `mode` and `options` are torch.compile's, for Inductor."""
        inductor_options = _inductor_options(mode, options)
        report = rewrite_sparse_linears(gm, example_inputs)
        training = torch.is_grad_enabled()
        if training:  # a training graph: the first optimizer step checks it took layers
            registry.note_compiled(t for t in example_inputs if isinstance(t, torch.nn.Parameter))
        if inductor_options.get("triton.cudagraphs") and report.rewritten:
            raise ShiraConfigError(
                f"torch.compile(mode={mode!r}) captures CUDA graphs, which shira_fx does not "
                "support for training graphs (the weights change between replays); use "
                "mode='max-autotune-no-cudagraphs' or the default mode"
            )
        self.reports.append(report)
        convolutions = holds_convolutions(gm)
        if training and convolutions and self.inner == "inductor":
            # a known Inductor bug: layout optimization gets convolution gradients wrong on the
            # CPU (tests/test_verify.py reproduces it without shira_fx); an explicit option wins
            inductor_options.setdefault("layout_optimization", False)
        checking = self.verify and training and bool(report.rewritten)
        if checking and self.inner == "inductor" and draws_random(gm):
            inductor_options.setdefault("fallback_random", True)  # random numbers drawn as eager does
        functorch_config = {}
        if self.memory_budget is not None:
            functorch_config["activation_memory_budget"] = self.memory_budget
        if report.rewritten:
            # AOTAutograd's cache would skip the partitioner, and with it the recompute tags'
            # count and the memory report; Inductor's own FX graph cache (codegen) still applies
            functorch_config["enable_autograd_cache"] = False
        with torch._functorch.config.patch(**functorch_config):
            # the reference compiles a copy: Inductor's own passes change the graph in place
            reference = torch._dynamo.lookup_backend("aot_eager")(copy.deepcopy(gm), example_inputs) if (
                checking) else None
            compiled = self._compile(gm, example_inputs, report, inductor_options)
        if checking:
            from torch._inductor import config as inductor_config

            layout = inductor_options.get("layout_optimization", inductor_config.layout_optimization)
            compiled = FirstCallVerified(compiled, reference, example_inputs, tolerance(gm, example_inputs),
                                         hint(str(self.inner), convolutions, layout),
                                         lambda found: setattr(report, "verified", found))
            report.verify_note = "not verified yet (the graph has not run)"
        elif training and report.rewritten:
            report.verify_note = ("not verified: the inner compiler is the reference itself"
                                  if self.verify is False and self.inner in ("aot_eager", "eager")
                                  else "not verified (verify=False)")
        if report.rewritten or report.skipped:
            log.info("shira_fx graph %d: %s", len(self.reports) - 1, report.summary())
        return compiled

    def layers(self) -> dict[str, str]:
        """Every prepared layer the backend saw: "rewritten" or the reason it was skipped
        (the latest graph that saw a layer wins)."""
        status: dict[str, str] = {}
        for report in self.reports:
            status.update(report.skipped)
            status.update(dict.fromkeys(report.rewritten, "rewritten"))
        return status


def backend(inner: str | Callable = "inductor", recompute: str = "auto",
            memory_budget: float | None = None, verify: bool | str = "auto") -> ShiraBackend:
    """`torch.compile(model, backend=shira_fx.backend())`: training graphs use the sparse
    gradient op for every prepared layer; inference graphs keep the dense linear.

    `inner`: "inductor", "aot_eager", "eager", any registered backend name or a backend
    callable. `recompute="auto"` rebuilds each adapted layer's input in backward instead of
    saving it; `memory_budget` is torch's activation memory budget for these compiles only.
    `verify` checks each training graph's gradients at its first call (see `ShiraBackend`).
    """
    return ShiraBackend(inner, recompute, memory_budget, verify)


# what torch.compile(model, backend="shira_fx") uses (the `torch_dynamo_backends` entry point)
default_backend = ShiraBackend()


def _register_name() -> None:
    """Register "shira_fx" with Dynamo unless its entry point is being loaded (then Dynamo
    registers `default_backend` itself, and a second registration would be refused)."""
    from torch._dynamo.backends import registry as dynamo_backends

    if "shira_fx" not in dynamo_backends._BACKENDS:
        dynamo_backends.register_backend(default_backend, name="shira_fx")


_register_name()


def explain(compiled_backend: ShiraBackend | None = None) -> str:
    """Human-readable account of what the backend did to each compiled graph (by default, the
    backend torch.compile(..., backend="shira_fx") uses)."""
    compiled_backend = default_backend if compiled_backend is None else compiled_backend
    if not compiled_backend.reports:
        return "shira_fx: nothing compiled yet (call the compiled model first)"
    parts = []
    for i, report in enumerate(compiled_backend.reports):
        parts.append(f"graph {i}: {report.summary()}")
    return "\n".join(parts)
