"""The text-classification harness that the demo, `shira-fx train` and the quality benches
share: fine-tune a pretrained encoder with a SHiRA adapter (through the shira_fx backend) or
with PEFT LoRA, measuring what they compare.

The classification head (masked mean pooling + one linear layer) trains alongside each adapter
and is identical in kind for both, so accuracy differences come from the adapter.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .adapter import SparseAdapter, prepare
from .compile.backend import backend
from .config import ShiraConfig
from .datasets import minilm_path
from .errors import ShiraAdapterError, ShiraError
from .memory import resident_state, saved_tensor_bytes, step_peak_bytes
from .serve.bank import AdapterBank
from .timing import median_ms
from .train import train_step

# every linear of the encoder blocks (attention q/k/v/out and the MLP), not the pooler
BERT_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                r"|intermediate\.dense|output\.dense)$")
PEFT_BERT_TARGETS = ["query", "key", "value", "dense"]  # PEFT matches suffixes; pooler excluded below


class TextClassifier(nn.Module):
    """A transformers encoder, masked mean pooling and a linear head; returns `.loss`/`.logits`
    like a transformers model so the same training code serves every adapter."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        logits = self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_backbone(layers: int | None = None, path: str | os.PathLike | None = None, **load) -> nn.Module:
    """An encoder from `path` (default: MiniLM-L6 from its wheel); `layers` keeps only the
    first blocks, for quick tests; `load` goes to `from_pretrained` (e.g. a quantization
    config). Dropout is turned off so runs are reproducible."""
    from transformers import AutoModel
    from transformers.utils import logging

    kwargs = dict(load) if layers is None else {"num_hidden_layers": layers, **load}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a truncated model would print every dropped block's keys
    try:
        model = AutoModel.from_pretrained(path or minilm_path(), **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def tokenize(texts: list[str], labels: list[int], seq: int, batch: int,
             path: str | os.PathLike | None = None) -> list[dict]:
    """Fixed-length batches (padding to `seq`), so one compiled graph serves every step."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or minilm_path())
    out = []
    for i in range(0, len(texts) - batch + 1, batch):
        enc = tok(texts[i:i + batch], padding="max_length", truncation=True, max_length=seq,
                  return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor(labels[i:i + batch])})
    return out


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[dict]) -> float:
    was_training = model.training
    model.eval()
    right = total = 0
    for b in batches:
        pred = model(b["input_ids"], b["attention_mask"]).logits.argmax(-1)
        right += int((pred == b["labels"]).sum())
        total += len(b["labels"])
    model.train(was_training)
    return right / total


@dataclass
class Run:
    """What one adapter's training measured."""

    name: str
    trainable: int
    losses: list[float] = field(default_factory=list)
    step_s: float = 0.0
    held_bytes: int = 0
    peak_bytes: int = 0
    accuracy: float = 0.0
    switch_s: float = 0.0


def fit(run: Run, step: Callable[[dict], float], batches: list[dict], steps: int,
        state: list[torch.Tensor], measure: Callable[[dict], torch.Tensor]) -> None:
    """Train `steps` steps with a progress bar; time each; measure the bytes the compiled
    step holds for backward on the last batch (parameters and buffers excluded)."""
    times = []
    bar = tqdm(range(steps), desc=f"train {run.name}", unit="step")
    for i in bar:
        t0 = time.perf_counter()
        run.losses.append(step(batches[i % len(batches)]))
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
    run.step_s = statistics.median(times[3:] or times)
    run.held_bytes, _ = saved_tensor_bytes(lambda: measure(batches[0]), exclude=state)


def make_classifier(num_classes: int, layers: int | None = None, seed: int = 0,
                    path: str | os.PathLike | None = None) -> TextClassifier:
    torch.manual_seed(seed)  # the head's initialisation
    return TextClassifier(load_backbone(layers, path), num_classes)


def _optimizer(adapter_params: list[nn.Parameter], head: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": adapter_params, "lr": lr},
                              {"params": list(head.parameters()), "lr": HEAD_LR}])


HEAD_LR = 1e-3


def train_shira(model: TextClassifier, cfg: ShiraConfig, train: list[dict],
                test: list[dict], steps: int, lr: float, inner: str | None = "inductor",
                name: str = "SHiRA (shira_fx)") -> tuple[Run, SparseAdapter]:
    """Prepare the backbone's targeted linears (the head stays trainable), train through the
    shira_fx backend with `train_step` (eagerly through the same op when `inner` is None), and
    evaluate. `grad`/`snip` masks calibrate on the first four training batches."""
    calib = train[:4] if cfg.mask in ("grad", "snip") else None
    adapter = prepare(model, cfg, calib=calib, progress=False)
    model.head.requires_grad_(True)
    params = list(adapter.parameters())
    opt = _optimizer(params, model.head, lr)
    run = Run(name, adapter.num_trainable())
    run.peak_bytes = step_peak_bytes(model, params + list(model.head.parameters()), train[0],
                                     adapter.check_optimizer)
    compiled = model if inner is None else torch.compile(model, backend=backend(inner=inner))

    @train_step(adapter, opt)
    def step(batch: dict) -> torch.Tensor:
        return compiled(**batch).loss

    state = resident_state(model)
    fit(run, step, train, steps, state, lambda b: compiled(**b).loss)
    run.accuracy = accuracy(model, test)
    return run, adapter


def bank_switch_time(model: TextClassifier, adapter: SparseAdapter, test: list[dict],
                     run: Run, repeat: int) -> AdapterBank:
    """Serve the trained adapter from a bank over the restored base; time deactivate+activate
    and check the bank reproduces the trained model's accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        adapter.save(path)
        adapter.remove()
        bank = AdapterBank(model)
        bank.load("trained", path)
    bank.activate("trained")
    served = accuracy(model, test)
    if abs(served - run.accuracy) > 1e-9:
        raise ShiraError(f"the bank served accuracy {served}, trained {run.accuracy}")

    def switch() -> None:
        bank.deactivate()
        bank.activate("trained")

    run.switch_s = median_ms(switch, repeat) / 1e3
    return bank


def lora_config(r: int, dropout: float = 0.0):
    """PEFT LoRA on the same linears as `BERT_TARGETS`, alpha = 2r."""
    import peft

    return peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                           target_modules=PEFT_BERT_TARGETS, exclude_modules=["pooler.dense"])


def train_lora(model: TextClassifier, r: int, train: list[dict], test: list[dict], steps: int,
               lr: float, inner: str | None = "inductor", name: str = "PEFT LoRA") -> Run:
    """Wrap the backbone with PEFT LoRA and train it (compiled with `inner`, eager when None)
    with its head."""
    import warnings

    import peft

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside PEFT
    model.backbone = peft.get_peft_model(model.backbone, lora_config(r))
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    opt = _optimizer(params, model.head, lr)
    run = Run(name, sum(p.numel() for p in params))
    run.peak_bytes = step_peak_bytes(model, params + list(model.head.parameters()), train[0])
    compiled = model if inner is None else torch.compile(model, backend=inner)

    def step(batch: dict) -> float:
        loss = compiled(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    state = resident_state(model)
    fit(run, step, train, steps, state, lambda b: compiled(**b).loss)
    run.accuracy = accuracy(model, test)
    return run


def lora_switch_time(model: TextClassifier, run: Run, repeat: int) -> None:
    """PEFT's way to serve a LoRA at no inference cost: merge, and unmerge to switch."""
    base = model.backbone.base_model
    base.merge_adapter()

    def switch() -> None:
        base.unmerge_adapter()
        base.merge_adapter()

    run.switch_s = median_ms(switch, repeat) / 1e3


def head_path(adapter_path: str | os.PathLike) -> str:
    """Where `shira-fx train` keeps the task head beside an adapter: `a.safetensors` ->
    `a.head.safetensors`."""
    root, ext = os.path.splitext(os.fspath(adapter_path))
    return f"{root}.head{ext or '.safetensors'}"


def save_head(head: nn.Linear, path: str | os.PathLike, classes: list[str]) -> None:
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              os.fspath(path), metadata={"classes": json.dumps(classes)})


def load_head(path: str | os.PathLike, hidden: int) -> tuple[nn.Linear, list[str]]:
    """A head written by `save_head`, checked against the backbone's hidden size."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            classes = json.loads((f.metadata() or {}).get("classes", "null"))
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except Exception as exc:  # safetensors raises several types for a bad file
        raise ShiraAdapterError(f"{path}: not a readable head file ({exc})") from exc
    if (not isinstance(classes, list) or weight.dim() != 2 or weight.shape != (len(classes), hidden)
            or bias.shape != (len(classes),)):
        raise ShiraAdapterError(
            f"{path}: head of shape {tuple(weight.shape)} does not fit a backbone of hidden size "
            f"{hidden} with its class list")
    head = nn.Linear(hidden, len(classes))
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head, classes
