"""Preparing a model must not keep it alive: the weight registry the backend reads holds only
weak references and forgets a weight when it dies."""

import gc
import weakref

import torch

import shira_fx
from shira_fx import registry
from shira_fx.registry import layer_for as layer_for_weight
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
    assert not set(ids) & set(registry._ENTRIES), "dead weights are still registered"


def test_remove_unregisters_and_a_new_prepare_registers_again():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    w = model[0]._parameters["weight"]  # the parameter itself (`.weight` reads it with the values)
    assert layer_for_weight(w) is adapter.layers["0"]
    adapter.remove()
    assert layer_for_weight(w) is None
    again = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    assert layer_for_weight(w) is again.layers["0"]


def test_an_entry_whose_weight_died_never_matches_a_tensor_that_reuses_its_id():
    adapter = shira_fx.prepare(tiny_models.build("mlp"), shira_fx.ShiraConfig(density=0.1), progress=False)
    ghost = torch.zeros(1)
    dead = weakref.ref(ghost)
    del ghost
    newcomer = torch.zeros(1)
    registry._ENTRIES[id(newcomer)] = (dead, weakref.ref(adapter.layers["0"]))  # as if the id were reused
    try:
        assert layer_for_weight(newcomer) is None
    finally:
        registry._ENTRIES.pop(id(newcomer), None)


def test_remove_forgets_every_tensor_registered_for_a_layer():
    model = tiny_models.build("mlp")
    adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.1), progress=False)
    gathered = torch.zeros_like(model[0].weight)  # what FSDP2's all-gather would hand the graph
    registry.register(gathered, adapter.layers["0"])
    assert layer_for_weight(gathered) is adapter.layers["0"]
    adapter.remove()
    assert layer_for_weight(gathered) is None and layer_for_weight(model[0].weight) is None
