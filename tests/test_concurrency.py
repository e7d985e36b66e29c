"""AdapterBank under threads: requests inside `bank.using(...)` always compute with exactly the
adapter they asked for, while other threads switch; the base comes back bit-exactly."""

from __future__ import annotations

import random
import threading

import pytest
import torch

import shira_fx
from shira_fx import ShiraAdapterError
from tests import tiny_models

NAMES = ["a", "b", "c"]


def _bank(tmp_path, kind="mlp"):
    model = tiny_models.build(kind)
    model.eval()
    bank = shira_fx.AdapterBank(model)
    for i, name in enumerate(NAMES):
        adapter = shira_fx.prepare(model, shira_fx.ShiraConfig(density=0.2, seed=i), progress=False)
        with torch.no_grad():
            for layer in adapter.layers.values():
                layer.values.normal_(generator=torch.Generator().manual_seed(i))
        adapter.sync()
        path = tmp_path / f"{name}.safetensors"
        adapter.save(path)
        adapter.remove()
        bank.load(name, path)
    return model, bank


def _run_threads(model, bank, x, forward, workers=3, requests=40, switches=60):
    """Workers make requests for random specs while a switcher thread activates and
    deactivates; returns the (spec, output) pairs the workers saw."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    specs = [*NAMES, None, {"a": 1.0, "c": 0.5}]
    expected = {}
    for spec in specs:
        bank.activate(spec) if spec is not None else bank.deactivate()
        expected[repr(spec)] = forward(x)
    bank.deactivate()
    seen, errors = [], []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(requests):
                spec = rng.choice(specs)
                with bank.using(spec):
                    out = forward(x)
                seen.append((repr(spec), out))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def switcher():
        rng = random.Random(99)
        try:
            for _ in range(switches):
                spec = rng.choice(specs)
                bank.activate(spec) if spec is not None else bank.deactivate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    threads.append(threading.Thread(target=switcher))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung: deadlock in the bank's gate"
    assert not errors, errors
    assert len(seen) == workers * requests
    for spec, out in seen:
        assert torch.equal(out, expected[spec]), f"a request for {spec} saw another adapter"
    bank.deactivate()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), f"{k} not restored bit-exactly"
    return {spec for spec, _ in seen}


@torch.no_grad()
def test_requests_see_their_adapter_while_another_thread_switches(tmp_path):
    model, bank = _bank(tmp_path)
    x = tiny_models.batch("mlp")["x"]
    requested = _run_threads(model, bank, x, lambda x: model(x).clone())
    assert len(requested) >= 4, "the workers exercised too few different adapters"


@torch.no_grad()
def test_compiled_requests_see_their_adapter(tmp_path):
    model, bank = _bank(tmp_path)
    compiled = torch.compile(model, backend="aot_eager")
    x = tiny_models.batch("mlp")["x"]
    requested = _run_threads(model, bank, x, lambda x: compiled(x).clone(), workers=2, requests=20,
                             switches=30)
    assert len(requested) >= 4, "the workers exercised too few different adapters"


def test_same_adapter_requests_share_and_nesting_rules(tmp_path):
    model, bank = _bank(tmp_path)
    inside = threading.Barrier(2, timeout=30)

    def request():
        with bank.using("a"):
            inside.wait()  # both requests are inside together: no switch between them

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert bank.active == {"a": 1.0}
    with bank.using("a") as m:
        assert m is model
        with bank.using("a"):  # the same adapter may nest
            pass
        with pytest.raises(ShiraAdapterError, match="inside using"):
            with bank.using("b"):
                pass
        with pytest.raises(ShiraAdapterError, match="deadlock"):
            bank.activate("b")
    with pytest.raises(ShiraAdapterError, match="not loaded"):
        with bank.using("zzz"):
            pass
    with bank.using(None):
        assert bank.active is None
