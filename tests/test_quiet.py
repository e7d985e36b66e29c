"""A quiet first run: the command line drops only the known messages of libraries it does not
use, and `prepare` draws no progress bar for masks that take milliseconds."""

from __future__ import annotations

import logging

import shira_fx
from shira_fx.cli import _quiet_unused_libraries
from tests import tiny_models


def test_the_command_line_drops_only_the_known_noise(caplog):
    _quiet_unused_libraries()
    _quiet_unused_libraries()  # once is enough: the filter is not added twice
    torchao = logging.getLogger("torchao")
    assert sum(type(f).__name__ == "_DropNoise" for f in torchao.filters) == 1
    with caplog.at_level(logging.WARNING):
        torchao.warning("Failed to load %s: Could not load this library", "_C_mxfp8.so")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s", "untrusted")
        pytree = logging.getLogger("torch.utils._pytree")
        pytree.warning("%s is an Enum subclass", "<enum 'KernelPreference'>")
        torchao.warning("a real problem")
        pytree.warning("%s is an Enum subclass", "<enum 'Other'>")
    assert [r.getMessage() for r in caplog.records] == ["a real problem",
                                                        "<enum 'Other'> is an Enum subclass"]


def test_prepare_draws_no_bar_for_quick_masks(capsys):
    model = tiny_models.build("mlp")
    shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1))  # progress=True, the default
    assert capsys.readouterr().err == ""
