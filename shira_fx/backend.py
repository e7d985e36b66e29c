"""`backend(cfg)`: the torch.compile backend that runs the SHiRA pass, then an inner compiler."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import fx

from .config import ShiraConfig
from .passes import RewriteReport, rewrite_sparse_linears

log = logging.getLogger("shira_fx")


class ShiraBackend:
    """A torch.compile backend: rewrite prepared linears, then hand the graph to `inner`
    ("inductor", "aot_eager", "eager", any registered backend name, or a backend callable).
    `reports` keeps one RewriteReport per compiled graph, in compile order."""

    def __init__(self, cfg: ShiraConfig | None = None, inner: str | Callable = "inductor"):
        self.cfg = cfg
        self.inner = inner
        self.reports: list[RewriteReport] = []

    def _inner_backend(self) -> Callable:
        if callable(self.inner):
            return self.inner
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx
        return torch._dynamo.lookup_backend(self.inner)

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        report = rewrite_sparse_linears(gm, example_inputs)
        self.reports.append(report)
        if report.rewritten or report.skipped:
            log.info("shira_fx graph %d: %s", len(self.reports) - 1, report.summary())
        return self._inner_backend()(gm, example_inputs)

    def layers(self) -> dict[str, str]:
        """Every prepared layer the backend saw: "rewritten" or the reason it was skipped
        (the latest graph that saw a layer wins)."""
        status: dict[str, str] = {}
        for report in self.reports:
            status.update(report.skipped)
            status.update(dict.fromkeys(report.rewritten, "rewritten"))
        return status


def backend(cfg: ShiraConfig | None = None, inner: str | Callable = "inductor") -> ShiraBackend:
    """`torch.compile(model, backend=shira_fx.backend(cfg))`: training graphs use the sparse
    gradient op for every prepared layer; inference graphs keep the dense linear."""
    return ShiraBackend(cfg, inner)


def explain(compiled_backend: ShiraBackend) -> str:
    """Human-readable account of what the backend did to each compiled graph."""
    if not compiled_backend.reports:
        return "shira_fx: nothing compiled yet (call the compiled model first)"
    parts = []
    for i, report in enumerate(compiled_backend.reports):
        parts.append(f"graph {i}: {report.summary()}")
    return "\n".join(parts)
