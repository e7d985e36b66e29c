"""Tiny transformers models built from configs (random weights, no downloads), dropout off so
eager, compiled and reference runs see the same computation."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_labels=3)
    return ViTForImageClassification(cfg)


def mlp():
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 8))


BUILDERS = {"llama": llama, "gpt2": gpt2, "bert": bert, "vit": vit, "mlp": mlp}


def batch(kind: str, seed: int = 0, size: int = 2, seq: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind in ("llama", "gpt2"):
        ids = torch.randint(0, VOCAB, (size, seq), generator=g)
        return {"input_ids": ids, "labels": ids}
    if kind == "bert":
        return {"input_ids": torch.randint(0, VOCAB, (size, seq), generator=g),
                "labels": torch.randint(0, 3, (size,), generator=g)}
    if kind == "vit":
        return {"pixel_values": torch.randn(size, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 3, (size,), generator=g)}
    return {"x": torch.randn(size * seq, 24, generator=g)}


def loss(model: nn.Module, b: dict) -> torch.Tensor:
    """The model's own loss for HF models; mean square output for the MLP."""
    if "x" in b:
        return model(b["x"]).pow(2).mean()
    return model(**b).loss


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[kind]()
