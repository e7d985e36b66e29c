"""`shira-fx check`: does the shira_fx backend compute the right gradients for this model? The
model's linears get a SHiRA adapter and a linear head; one batch of random tokens goes through
the model compiled with the shira_fx backend and through the eager model, and the values'
gradients are compared layer by layer (`shira_fx.verify`)."""

from __future__ import annotations

import torch

from ..adapter import prepare
from ..compile.check import verify
from ..compile.verify import Verification
from ..config import ShiraConfig
from ..datasets import resolve_model
from ..errors import ShiraTrainingError
from ..finetune import make_classifier


def run_check(model: str | None = "minilm", targets: str | None = None, mask: str = "rand",
              density: float = 0.01, r: int | None = None, batch: int = 4, seq: int = 32,
              inner: str = "inductor", layers: int | None = None, seed: int = 0) -> Verification:
    """Prepare the model folder's encoder, compare compiled and eager gradients on one batch,
    print the per-layer table; ShiraTrainingError when a layer's gradient is wrong."""
    path = resolve_model(model)
    classifier = make_classifier(2, layers, seed, path)
    budget = {"r": r} if r else {"density": density}
    adapter = prepare(classifier, ShiraConfig(target_modules=targets, mask=mask, seed=seed, **budget),
                      progress=False)
    g = torch.Generator().manual_seed(seed)
    vocab = classifier.backbone.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,),
                                                                                            generator=g)}
    found = verify(classifier, data, inner=inner)
    print(f"{path.name}: {len(adapter.layers)} prepared layers, batch {batch}x{seq}, compiled with "
          f"shira_fx.backend(inner={inner!r}) against eager\n")
    print(found.table())
    wrong = [c.name for c in found.layers if not c.ok]
    if wrong:
        raise ShiraTrainingError(f"{len(wrong)} of {len(found.layers)} layers get wrong gradients "
                                 f"compiled (first: {wrong[0]}); compile with inner='aot_eager'")
    print(f"\nall {len(found.layers)} layers: compiled gradients equal eager's within {found.tol:g}")
    return found
