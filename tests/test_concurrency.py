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
from tests.thread_helpers import join, start, until

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


@pytest.mark.parametrize("backend", [pytest.param("inductor", marks=pytest.mark.slow), "aot_eager"])
@torch.no_grad()
def test_compiled_requests_see_their_adapter(tmp_path, backend):
    model, bank = _bank(tmp_path)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    x = tiny_models.batch("mlp")["x"]
    requested = _run_threads(model, bank, x, lambda x: compiled(x).clone(), workers=2, requests=20,
                             switches=30)
    assert len(requested) >= 4, "the workers exercised too few different adapters"








def _log_switches(bank, log: list) -> None:
    """Record every weight switch in `log` (switches run with the gate held exclusively, so
    their order against what requests log inside their blocks is the real order)."""
    activate = bank._activate

    def logged(spec):
        log.append(("switch", dict(spec)))
        activate(spec)

    bank._activate = logged


def test_requests_for_the_active_adapter_do_not_switch(tmp_path):
    model, bank = _bank(tmp_path)
    switches = []
    _log_switches(bank, switches)
    bank.activate("a")
    for _ in range(5):
        with bank.using("a"):
            pass
        with bank.using({"a": 1}):
            pass
    assert switches == [("switch", {"a": 1.0})]
    with bank.using(None):
        pass
    with bank.using(None):
        pass
    assert switches == [("switch", {"a": 1.0}), ("switch", {})]


def test_a_waiting_switch_holds_new_requests_back(tmp_path):
    """Writer preference: once a switch waits, a new request for the active adapter queues
    behind it (it then switches back for itself), so a busy adapter cannot starve switches."""
    model, bank = _bank(tmp_path)
    gate, log, errors = bank._gate, [], []
    _log_switches(bank, log)
    inside, leave = threading.Event(), threading.Event()

    def first():
        with bank.using("a"):
            log.append("first in")
            inside.set()
            assert leave.wait(60)
            log.append("first leaving")

    def late():
        with bank.using("a"):
            log.append(("late in", bank.active))

    threads = [start(first, errors)]
    assert inside.wait(60)
    threads.append(start(lambda: bank.activate("b"), errors))
    until(lambda: gate.waiting == 1, "the switch to wait")
    threads.append(start(late, errors))
    until(lambda: gate.blocked == 1, "the late request to be held back")
    assert gate.readers == 1 and log == [("switch", {"a": 1.0}), "first in"]
    leave.set()
    join(threads, errors)
    assert log == [("switch", {"a": 1.0}), "first in", "first leaving", ("switch", {"b": 1.0}),
                   ("switch", {"a": 1.0}), ("late in", {"a": 1.0})]


def test_requests_queued_for_one_switch_share_it(tmp_path):
    """Three requests for "b" arrive while "a" is busy: one switches, and the other two join
    it without waiting for it to finish (the barrier needs all three inside at once)."""
    model, bank = _bank(tmp_path)
    gate, log, errors = bank._gate, [], []
    _log_switches(bank, log)
    inside, leave = threading.Event(), threading.Event()
    together = threading.Barrier(3, timeout=60)

    def first():
        with bank.using("a"):
            inside.set()
            assert leave.wait(60)

    def request():
        with bank.using("b"):
            together.wait()

    threads = [start(first, errors)]
    assert inside.wait(60)
    threads += [start(request, errors) for _ in range(3)]
    until(lambda: gate.blocked == 3, "the three requests to queue")
    leave.set()
    join(threads, errors)
    assert log == [("switch", {"a": 1.0}), ("switch", {"b": 1.0})]
    assert gate.readers == gate.waiting == gate.blocked == 0 and not gate.writing


def test_an_error_inside_a_request_releases_the_gate(tmp_path):
    model, bank = _bank(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with bank.using("a"):
            raise RuntimeError("boom")
    errors = []
    join([start(lambda: bank.activate("b"), errors)], errors)  # would hang on a leaked reader
    assert bank.active == {"b": 1.0}
    gate = bank._gate
    assert gate.readers == gate.waiting == gate.blocked == 0 and not gate.writing


@torch.no_grad()
def test_a_request_for_an_adapter_unloaded_while_it_waits_is_refused(tmp_path):
    """The request and the unload both wait for a busy adapter; whichever goes first, the
    request either computes with "b" or is refused with ShiraAdapterError."""
    model, bank = _bank(tmp_path)
    x = tiny_models.batch("mlp")["x"]
    bank.activate("b")
    expected = model(x).clone()
    bank.deactivate()
    gate, errors, outcome = bank._gate, [], []
    inside, leave = threading.Event(), threading.Event()

    def first():
        with bank.using("a"):
            inside.set()
            assert leave.wait(60)

    def request():
        try:
            with bank.using("b"):
                outcome.append(model(x).clone())
        except ShiraAdapterError as exc:
            outcome.append(exc)

    threads = [start(first, errors)]
    assert inside.wait(60)
    threads.append(start(request, errors))
    until(lambda: gate.waiting == 1, "the request to queue")
    threads.append(start(lambda: bank.unload("b"), errors))
    until(lambda: gate.waiting == 2, "the unload to queue")
    leave.set()
    join(threads, errors)
    assert "b" not in bank and len(outcome) == 1
    if isinstance(outcome[0], ShiraAdapterError):
        assert "not loaded" in str(outcome[0])
    else:
        assert torch.equal(outcome[0], expected)


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
