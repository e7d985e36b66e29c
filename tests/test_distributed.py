"""SHiRA under DistributedDataParallel and FSDP2: two CPU processes (gloo) train a tiny Llama
through the shira_fx backend, each on half of every batch, and end where one process ends
on the whole batch; only the values ever get gradients and the base stays bit-exact."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import shira_fx
from shira_fx.distributed import shard_map
from shira_fx.layer import VALUES
from tests import tiny_models

WORLD, STEPS, BATCH = 2, 4, 4
CFG = shira_fx.ShiraConfig(density=0.1, seed=1)


def train(rank: int, world: int, mode: str, inner: str, accumulate: int = 1,
          out: str | None = None, init: str | None = None) -> dict:
    """STEPS calls of an AdamW train_step on rank's share of each batch, then one more backward
    to read the gradients; returns (and saves to `out`) the values, those gradients, the full
    weights, the names of model parameters other than values that got a gradient, and the
    full weights after `adapter.remove()`."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch._dynamo.reset()
    if mode == "fsdp-meta":  # the big-model flow: meta, prepare, fully_shard, to_empty, load
        with torch.device("meta"):
            model = tiny_models.llama()
    else:
        model = tiny_models.build("llama")
    adapter = shira_fx.prepare(model, CFG, progress=False)
    net = model
    if world > 1 and mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif world > 1 and mode.startswith("fsdp"):
        shira_fx.distributed.fully_shard(model, adapter, modules=list(model.model.layers))
    if mode == "fsdp-meta":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device="cpu")
        real = tiny_models.build("llama")
        with torch.no_grad():  # non-persistent buffers (rotary frequencies) are not in a state dict
            for name, buf in real.named_buffers():
                model.get_buffer(name).copy_(buf)
        set_model_state_dict(model, real.state_dict(), options=StateDictOptions(full_state_dict=True))
    backend = shira_fx.backend(inner=inner)
    compiled = torch.compile(net, backend=backend)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)

    def share(seed: int) -> dict:
        return {k: v.chunk(world)[rank] for k, v in tiny_models.batch("llama", seed, BATCH).items()}

    @shira_fx.train_step(adapter, opt, accumulate=accumulate)
    def step(batch):
        return compiled(**batch).loss

    for i in range(STEPS):
        step(share(i))
    compiled(**share(STEPS)).loss.backward()
    values = {id(p) for p in adapter.parameters()}
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    result = {
        "values": [la.values.detach().clone() for la in adapter.layers.values()],
        "grads": [la.values.grad.clone() for la in adapter.layers.values()],
        "weights": {k: full(v).detach().clone() for k, v in model.state_dict().items()},
        "base_grads": [n for n, p in model.named_parameters()
                       if id(p) not in values and p.grad is not None],
        "layers": backend.layers(),
    }
    adapter.remove()
    result["removed"] = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
    if world > 1:
        dist.destroy_process_group()
    if out is not None:
        torch.save(result, out)
    return result


def _spawn(mode: str, inner: str, accumulate: int, tmp_path) -> list[dict]:
    return _on_ranks(_worker, (mode, inner, accumulate), tmp_path, mode)


def _on_ranks(worker, args: tuple, tmp_path, label: str, timeout: float = 400.0) -> list[dict]:
    """Run `worker(rank, *args, outs, init)` on WORLD processes and load what each saved; a
    hang (a collective one rank never joins) fails the test instead of blocking the suite."""
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.spawn(worker, args=(*args, outs, init), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{label}: the {WORLD} processes did not finish in {timeout:.0f} s")
    return [torch.load(o) for o in outs]


def _worker(rank: int, mode: str, inner: str, accumulate: int, outs: list[str], init: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    train(rank, WORLD, mode, inner, accumulate, outs[rank], init)


def _check_against_one_process(ranks: list[dict], inner: str, accumulate: int) -> None:
    ref = train(0, 1, "single", inner, accumulate)
    initial = tiny_models.build("llama").state_dict()
    adapter_layers = shira_fx.prepare(tiny_models.build("llama"), CFG, progress=False).layers
    for r in ranks:
        assert r["base_grads"] == [], "a frozen base weight got a gradient"
        assert set(r["layers"].values()) == {"rewritten"}, r["layers"]
        assert len(r["layers"]) == len(adapter_layers)
        for a, b in zip(r["values"], ranks[0]["values"], strict=True):
            assert torch.equal(a, b), "the ranks' values diverged"
        for got, want in zip(r["values"] + r["grads"], ref["values"] + ref["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert max(v.abs().max() for v in ref["values"]) > 1e-3, "training did not move the values"
    weights = ranks[0]["weights"]
    assert weights.keys() == initial.keys()
    for name, layer in adapter_layers.items():
        w, w0 = weights[f"{name}.weight"].view(-1), initial[f"{name}.weight"].view(-1)
        idx = layer.indices.long()
        untouched = torch.ones_like(w0, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(w[untouched], w0[untouched]), f"{name}: a base element moved"
        values = ranks[0]["values"][list(adapter_layers).index(name)]
        assert torch.equal(w[idx], w0[idx] + values), f"{name}: fused weight != base + values"
    for name, w in weights.items():
        if not any(name == f"{n}.weight" for n in adapter_layers):
            assert torch.equal(w, initial[name]), name
    for name, w in ranks[0]["removed"].items():
        assert torch.equal(w, initial[name]), f"{name}: remove() did not restore the base exactly"


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    ranks = _spawn("ddp", "inductor", 1, tmp_path)
    _check_against_one_process(ranks, "inductor", 1)


@pytest.mark.distributed
def test_fsdp2_meta_init_flow_equals_one_process(tmp_path):
    """meta device, prepare, fully_shard, to_empty, load the full state dict: each rank takes
    its base values when the weights arrive, and training equals one process."""
    ranks = _spawn("fsdp-meta", "aot_eager", 1, tmp_path)
    _check_against_one_process(ranks, "aot_eager", 1)


@pytest.mark.distributed
def test_fsdp2_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    # accumulate=2: the values' gradients are averaged after each backward, and the second
    # average adds to the first (equal on every rank), which must equal averaging the sum
    ranks = _spawn("fsdp", "aot_eager", 2, tmp_path)
    _check_against_one_process(ranks, "aot_eager", 2)


def test_the_values_are_module_parameters_outside_the_state_dict():
    model = tiny_models.build("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    adapter = shira_fx.prepare(model, CFG, progress=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter.parameters()}
    assert all(n.endswith(VALUES) for n, p in model.named_parameters() if p.requires_grad)
    assert model.state_dict().keys() == base.keys()
    model.load_state_dict(base)  # strict: the values are not missing keys
    adapter.remove()
    assert [n for n, _ in model.named_parameters()] == names
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("shape,offset,local", [
    ((5, 7), (3, 0), (2, 7)),   # the last of three uneven row shards
    ((6, 8), (0, 4), (6, 4)),   # a column shard
    ((6, 8), (2, 4), (2, 4)),   # a block of a 2-D mesh
    ((4, 4), (4, 0), (0, 4)),   # an empty shard (more ranks than rows)
])
def test_shard_map_translates_exactly_the_indices_a_block_holds(shape, offset, local):
    g = torch.Generator().manual_seed(0)
    numel = shape[0] * shape[1]
    indices = torch.randperm(numel, generator=g)[: numel // 3].sort().values.to(torch.int32)
    weight = torch.arange(numel).view(shape)
    block = weight[offset[0]:offset[0] + local[0], offset[1]:offset[1] + local[1]].contiguous()
    local_indices, own = shard_map(indices, shape[1], local, offset)
    held = set(block.view(-1).tolist())
    assert indices[own].tolist() == [i for i in indices.tolist() if i in held]
    assert block.view(-1)[local_indices.long()].tolist() == indices[own].tolist()


def train_4bit(rank: int, world: int, folder: str, out: str | None = None, init: str | None = None) -> dict:
    """The tiny Llama saved in `folder`, loaded in 4 bits (bitsandbytes NF4), prepared (the
    adapter beside the packed weights), STEPS AdamW steps on rank's share of each batch under
    DDP (eager); returns the values, the packed weights and the last loss."""
    import transformers

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu")
    packed = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    adapter = shira_fx.prepare(model, CFG, progress=False)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2)

    @shira_fx.train_step(adapter, opt)
    def step(batch):
        return net(**batch).loss

    losses = [float(step({k: v.chunk(world)[rank] for k, v in tiny_models.batch("llama", i, BATCH).items()}))
              for i in range(STEPS)]
    result = {"values": [la.values.detach().clone() for la in adapter.layers.values()],
              "packed_unchanged": all(torch.equal(v, model.state_dict()[k]) for k, v in packed.items()),
              "packed": len(packed), "losses": losses}
    if world > 1:
        dist.destroy_process_group()
    if out is not None:
        torch.save(result, out)
    return result


def _worker_4bit(rank: int, folder: str, outs: list[str], init: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    train_4bit(rank, WORLD, folder, outs[rank], init)


@pytest.mark.distributed
def test_ddp_on_a_4bit_base_equals_one_process(tmp_path):
    """DDP over a bitsandbytes NF4 base (the adapter beside the packed weights): the two ranks'
    values equal one process trained on the whole batch, and no packed weight changes."""
    pytest.importorskip("bitsandbytes")
    folder = tmp_path / "fp32"
    tiny_models.build("llama").save_pretrained(folder)
    ranks = _on_ranks(_worker_4bit, (str(folder),), tmp_path, "4-bit DDP")
    ref = train_4bit(0, 1, str(folder))
    assert ref["packed"] > 0 and ref["packed_unchanged"]
    assert max(v.abs().max() for v in ref["values"]) > 1e-3, "training did not move the values"
    for r in ranks:
        assert r["packed_unchanged"], "a packed 4-bit weight changed"
        for got, want in zip(r["values"], ref["values"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
