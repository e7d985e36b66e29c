"""A table of transformers architectures, each built tiny from its config class (random weights,
no downloads, dropout off), with a batch that gives a scalar loss.

One `Arch` per architecture: `build()` returns the seeded model, `batch()` its inputs and
`loss(model, batch)` the scalar to back-propagate. Classes are named, not imported, and resolved
only when a model is built: importing every one of them costs ~10 s, which the fast tier (that
only collects the sweep) should not pay. An architecture whose classes this transformers version
lacks is skipped, with the reason in `skip`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn

VOCAB = 64
BATCH = 2
SEQ = 7
IMAGE = 16  # pixels a side; patches of 4
LABELS = 3


# ---- batches: seeded, so every call gives the same tensors ------------------------------------

def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _ids(g: torch.Generator, seq: int = SEQ) -> Tensor:
    # from 4 up: clear of the ids the configs use for pad/bos/eos/decoder start
    return torch.randint(4, VOCAB, (BATCH, seq), generator=g)


def _pixels(g: torch.Generator) -> Tensor:
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)


def causal_lm_batch() -> dict:
    ids = _ids(_gen())
    return {"input_ids": ids, "labels": ids}


def text_classifier_batch() -> dict:
    g = _gen()
    return {"input_ids": _ids(g), "labels": torch.randint(0, LABELS, (BATCH,), generator=g)}


def seq2seq_batch() -> dict:
    g = _gen()
    return {"input_ids": _ids(g), "labels": _ids(g, seq=5)}


def image_classifier_batch() -> dict:
    g = _gen()
    return {"pixel_values": _pixels(g), "labels": torch.randint(0, LABELS, (BATCH,), generator=g)}


def speech_batch() -> dict:
    """16 mel bins, 32 frames (the tiny Whisper's 2 * max_source_positions)."""
    g = _gen()
    return {"input_features": torch.randn(BATCH, 16, 32, generator=g), "labels": _ids(g, seq=5)}


def image_text_batch() -> dict:
    """Paired texts and images; CLIP and SigLIP compute their contrastive loss."""
    g = _gen()
    return {"input_ids": _ids(g), "pixel_values": _pixels(g), "return_loss": True}


def own_loss(model: nn.Module, batch: dict) -> Tensor:
    """The model's own loss: LM or classifier labels, or the contrastive loss of `return_loss`."""
    return model(**batch).loss


# ---- the entry -------------------------------------------------------------------------------

@functools.cache
def _transformers_names() -> frozenset[str]:
    return frozenset(dir(transformers))  # the lazy module's names, without importing them


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # decoder | moe | ssm | encoder | seq2seq | speech | vision | vision-text
    model_class: str  # transformers class names, resolved in `build`
    config_class: str
    batch: Callable[[], dict]
    config: dict  # the config class's arguments
    loss: Callable[[nn.Module, dict], Tensor] = own_loss

    @property
    def skip(self) -> str | None:
        """Why this transformers cannot build the architecture, or None."""
        missing = [c for c in (self.model_class, self.config_class) if c not in _transformers_names()]
        return f"transformers {transformers.__version__} has no {', '.join(missing)}" if missing else None

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**self.config)
        return getattr(transformers, self.model_class)(config)


def decoder(name: str, model_class: str, config_class: str, family: str = "decoder", **config) -> Arch:
    """A causal LM trained on its own next-token loss."""
    return Arch(name, family, model_class, config_class, causal_lm_batch, config)


# ---- config helpers --------------------------------------------------------------------------

def decoder_sizes(**extra) -> dict:
    """The Llama-style size fields most decoder configs share (`extra` overrides them)."""
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {**sizes, **extra}


def moe_sizes(**extra) -> dict:
    return decoder_sizes(**{"num_experts_per_tok": 2, **extra})


def bert_sizes(**extra) -> dict:
    """BERT-style encoder fields, dropout off (`extra` overrides them)."""
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, num_labels=LABELS)
    return {**sizes, **extra}


def towers(**extra) -> dict:
    """The text and vision tower configs of CLIP/SigLIP (`extra`: the joint config's fields)."""
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 attention_dropout=0.0)
    text = dict(tower, vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    return dict(text_config=text, vision_config=dict(tower, image_size=IMAGE, patch_size=4), **extra)


# ---- the table -------------------------------------------------------------------------------

DECODERS = [
    decoder("llama", "LlamaForCausalLM", "LlamaConfig", **decoder_sizes()),
    decoder("mistral", "MistralForCausalLM", "MistralConfig", **decoder_sizes(head_dim=8)),
    decoder("qwen2", "Qwen2ForCausalLM", "Qwen2Config", **decoder_sizes()),
    decoder("qwen3", "Qwen3ForCausalLM", "Qwen3Config", **decoder_sizes(head_dim=8)),
    decoder("gemma", "GemmaForCausalLM", "GemmaConfig", **decoder_sizes(head_dim=8)),
    decoder("gemma2", "Gemma2ForCausalLM", "Gemma2Config",
            **decoder_sizes(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)),
    decoder("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextConfig",
            **decoder_sizes(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)),
    decoder("phi", "PhiForCausalLM", "PhiConfig",
            **decoder_sizes(num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0)),
    decoder("phi3", "Phi3ForCausalLM", "Phi3Config", **decoder_sizes(resid_pdrop=0.0, embd_pdrop=0.0)),
    decoder("gpt2", "GPT2LMHeadModel", "GPT2Config",
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    decoder("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
            **decoder_sizes(rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0)),
    decoder("gptj", "GPTJForCausalLM", "GPTJConfig",
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=32,
            rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
            eos_token_id=2),
    decoder("opt", "OPTForCausalLM", "OPTConfig",
            vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2),
    decoder("bloom", "BloomForCausalLM", "BloomConfig",
            vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
            attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    decoder("mpt", "MptForCausalLM", "MptConfig",
            vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=32,
            resid_pdrop=0.0, emb_pdrop=0.0, attn_config={"attn_pdrop": 0}),
    decoder("stablelm", "StableLmForCausalLM", "StableLmConfig",
            **decoder_sizes(partial_rotary_factor=0.25)),
    decoder("starcoder2", "Starcoder2ForCausalLM", "Starcoder2Config",
            **decoder_sizes(residual_dropout=0.0, embedding_dropout=0.0)),
    decoder("olmo", "OlmoForCausalLM", "OlmoConfig", **decoder_sizes()),
    decoder("olmo2", "Olmo2ForCausalLM", "Olmo2Config", **decoder_sizes()),
    decoder("cohere", "CohereForCausalLM", "CohereConfig", **decoder_sizes()),
    decoder("granite", "GraniteForCausalLM", "GraniteConfig", **decoder_sizes()),
    # Falcon-7B's layout: multi-query attention, attention and MLP in parallel
    decoder("falcon", "FalconForCausalLM", "FalconConfig",
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2),
]

MOE = [
    decoder("mixtral", "MixtralForCausalLM", "MixtralConfig", family="moe",
            **moe_sizes(head_dim=8, num_local_experts=4)),
    decoder("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", family="moe",
            **moe_sizes(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                        decoder_sparse_step=1)),
    decoder("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", family="moe",
            **moe_sizes(head_dim=8, num_experts=4, moe_intermediate_size=16, decoder_sparse_step=1)),
    # layer 0 dense, layer 1 MoE (4 routed experts, 1 shared); multi-head latent attention
    decoder("deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3Config", family="moe",
            **moe_sizes(num_key_value_heads=4, moe_intermediate_size=16, first_k_dense_replace=1,
                        n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                        q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
                        v_head_dim=8)),
]

SSM = [
    decoder("mamba", "MambaForCausalLM", "MambaConfig", family="ssm",
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
            conv_kernel=4, time_step_rank=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # layer 0: mamba mixer + MoE (2 experts), layer 1: attention + dense MLP
    decoder("jamba", "JambaForCausalLM", "JambaConfig", family="ssm",
            **decoder_sizes(num_experts=2, num_experts_per_tok=1, expert_layer_period=2,
                            expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
                            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)),
]

ENCODERS = [
    Arch("bert", "encoder", "BertForSequenceClassification", "BertConfig", text_classifier_batch,
         bert_sizes()),
    Arch("roberta", "encoder", "RobertaForSequenceClassification", "RobertaConfig",
         text_classifier_batch,
         # positions start after padding_idx (1): room for 2 more than the longest sequence
         bert_sizes(max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    # DeBERTa-v3's attention: disentangled relative positions, key/query projections shared
    Arch("deberta_v2", "encoder", "DebertaV2ForSequenceClassification", "DebertaV2Config",
         text_classifier_batch,
         bert_sizes(relative_attention=True, pos_att_type=["p2c", "c2p"],
                    position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True,
                    pooler_hidden_size=32, pooler_dropout=0.0)),
]

SEQ2SEQ = [
    Arch("t5", "seq2seq", "T5ForConditionalGeneration", "T5Config", seq2seq_batch, dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=2,
        decoder_start_token_id=0)),
    Arch("bart", "seq2seq", "BartForConditionalGeneration", "BartConfig", seq2seq_batch, dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2)),
]

SPEECH = [
    Arch("whisper", "speech", "WhisperForConditionalGeneration", "WhisperConfig", speech_batch, dict(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_source_positions=16, max_target_positions=32, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None)),
]

VISION = [
    Arch("vit", "vision", "ViTForImageClassification", "ViTConfig", image_classifier_batch, dict(
        image_size=IMAGE, patch_size=4, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_labels=LABELS, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)),
]

VISION_TEXT = [
    Arch("clip", "vision-text", "CLIPModel", "CLIPConfig", image_text_batch, towers(projection_dim=16)),
    Arch("siglip", "vision-text", "SiglipModel", "SiglipConfig", image_text_batch, towers()),
]

ARCHS: list[Arch] = DECODERS + MOE + SSM + ENCODERS + SEQ2SEQ + SPEECH + VISION + VISION_TEXT
assert len({a.name for a in ARCHS}) == len(ARCHS), "two entries share a name"
