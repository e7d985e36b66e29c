"""Diffusion models as a style adapter trains them: a UNet's attention and convolutions, SD3's
and Flux's joint-attention transformers (tiny, from configs) get the dense model's gradient at
the mask eagerly and compiled; a Stable Diffusion pipeline from dummy components trains two
styles, serves them from one AdapterBank on `pipe.unet` and gives exactly the images of a
dense-merged twin, switching and fusing between calls."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import shira_fx
from tests import diffusion_models

pytest.importorskip("diffusers")

MODES = ["eager", pytest.param("aot_eager", marks=pytest.mark.slow),
         pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["unet", "sd3", "flux"])
def test_diffusion_models_get_the_dense_gradient_at_the_mask(kind, mode):
    torch._dynamo.reset()
    dense = diffusion_models.BUILDERS[kind]()
    model = copy.deepcopy(dense)
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(target_modules=diffusion_models.TARGETS[kind],
                                                           density=0.05), progress=False)
    convs = [la for la in adapter.layers.values() if la.conv]
    assert (len(convs) > 0) == (kind == "unet") and len(adapter.layers) > len(convs)
    backend = shira_fx.backend(inner=mode) if mode != "eager" else None
    run = model if backend is None else torch.compile(model, backend=backend)
    diffusion_models.loss(run, diffusion_models.batch(kind)).backward()
    diffusion_models.loss(dense, diffusion_models.batch(kind)).backward()
    for name, la in adapter.layers.items():
        want = dense.get_submodule(name).weight.grad.reshape(-1)[la.indices.long()]
        rel = float((la.values.grad - want).norm() / want.norm().clamp_min(1e-12))
        assert rel < 1e-4, (name, rel)
    if backend is not None:
        assert set(backend.layers().values()) == {"rewritten"}, backend.layers()


def _merged_twin(folder: str, adapters: dict[str, shira_fx.SparseAdapter], spec: dict[str, float]):
    """A fresh pipeline whose UNet holds base + Σ w·delta densely (the dense-merged twin)."""
    from examples.diffusers_styles import dummy_pipeline

    twin = dummy_pipeline(folder)
    with torch.no_grad():
        for name in next(iter(adapters.values())).layers:
            w = twin.unet.get_submodule(name).weight
            delta = torch.zeros(w.numel(), dtype=torch.float32)
            for adapter_name, weight in sorted(spec.items()):
                la = adapters[adapter_name].layers[name]
                delta.index_add_(0, la.indices.long(), la.removed[0].float() * weight)
            w.view(-1).copy_((w.view(-1).float() + delta).to(w.dtype))
    return twin


def test_a_pipeline_serves_two_trained_styles_as_a_dense_merged_twin(tmp_path):
    from examples.diffusers_styles import dummy_pipeline, images, train_style

    pipe = dummy_pipeline(str(tmp_path / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe, "a cat", 1)
    adapters = {name: train_style(
        pipe, f"a cat in {name} style", seed, 2, str(tmp_path / f"{name}.safetensors"))
                for name, seed in (("watercolor", 1), ("neon", 2))}
    assert all(la.conv for la in adapters["neon"].layers.values() if ".resnets." in la.name)
    bank = shira_fx.AdapterBank(pipe.unet)
    for name in adapters:
        bank.load(name, tmp_path / f"{name}.safetensors")
    for spec in ({"watercolor": 1.0}, {"neon": 1.0}, {"watercolor": 1.0, "neon": 0.5}):
        bank.activate(spec)
        got = images(pipe, "a cat", 1)
        twin = _merged_twin(str(tmp_path / "twin"), adapters, spec)
        twin.set_progress_bar_config(disable=True)
        assert (got == images(twin, "a cat", 1)).all(), json.dumps(spec)
        assert not (got == base).all()
    bank.deactivate()
    assert (images(pipe, "a cat", 1) == base).all()


@pytest.mark.slow
def test_the_diffusers_styles_example_runs_offline(monkeypatch, tmp_path):
    from examples import diffusers_styles

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = diffusers_styles.main(["--smoke"])
    assert set(out) == {"null", '"watercolor"', '"neon"', json.dumps({"watercolor": 1.0, "neon": 0.5})}
    assert os.environ["HF_HUB_OFFLINE"] == "1"
