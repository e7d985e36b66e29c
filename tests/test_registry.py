"""Preparing a model must not keep it alive: the weight registry the backend reads holds only
weak references and forgets a weight when it dies."""

import gc
import weakref

import shira_fx
from shira_fx.adapter import _REGISTRY, layer_for_weight
from tests import tiny_models


def test_a_dropped_prepared_model_is_freed_and_forgotten():
    model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.05), progress=False)
    weights = [layer.weight for layer in adapter.layers.values()]
    ids = [id(w) for w in weights]
    assert all(layer_for_weight(w) is adapter.layers[n] for n, w in zip(adapter.layers, weights, strict=True))
    alive = weakref.ref(model)
    del model, adapter, weights
    gc.collect()
    assert alive() is None, "the registry kept a prepared model alive"
    assert not set(ids) & set(_REGISTRY), "dead weights are still registered"


def test_remove_unregisters_and_a_new_prepare_registers_again():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    w = model[0].weight
    assert layer_for_weight(w) is adapter.layers["0"]
    adapter.remove()
    assert layer_for_weight(w) is None
    again = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    assert layer_for_weight(w) is again.layers["0"]
