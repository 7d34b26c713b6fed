"""Tiny transformers models for the compatibility matrix (tests/compat/test_matrix.py): every architecture built
from a small config with random weights (nothing is downloaded), dropout off, plus one training batch per seed.

``build(name)`` returns an :class:`Arch`: the model (float32, eval mode), its inputs, and what the architecture
offers (``generates``; ``explicit_positions``: the keyword arguments that give every example its own copy of the
position ids the model otherwise shares across the batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 128  # a multiple of 16, so FP8 takes the LM heads
HIDDEN, HEADS, LAYERS, FFN = 32, 4, 2, 64
BATCH, SEQ, TARGET = 3, 7, 5
CLASSES = 3
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Every architecture of the matrix, in the README's order.
ARCHITECTURES = (
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "phi", "phi3", "gpt_neox", "opt", "starcoder2",
    "falcon", "bert", "roberta", "distilbert", "vit", "whisper", "bart", "t5",
)  # fmt: skip


@dataclass
class Arch:
    name: str
    model: torch.nn.Module
    kind: str  # "causal" (decoder-only LM), "encoder" (sequence classification), "seq2seq", "vision", "speech"
    inputs: Callable[[int], dict]  # seed -> keyword inputs of one training batch, labels included
    generates: bool
    explicit_positions: Callable[[dict], dict] | None  # batch -> per-example position kwargs, or None


def _ids(g: torch.Generator, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def right_padded_mask(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    """All ones but the last example, which is two tokens shorter (padding on the right)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 2 :] = 0
    return mask


def _arange_positions(key: str = "position_ids", ids_key: str = "input_ids"):
    """0..seq-1 for every example, as its own row: the ids the model would otherwise share as (1, seq)."""

    def positions(batch: dict) -> dict:
        b, n = batch[ids_key].shape
        return {key: torch.arange(n).expand(b, n).contiguous()}

    return positions


def _causal_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = _ids(g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _encoder_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = right_padded_mask()
    return {
        "input_ids": _ids(g).masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "labels": torch.randint(0, CLASSES, (BATCH,), generator=g),
    }


def _seq2seq_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = right_padded_mask()
    return {"input_ids": _ids(g).masked_fill(mask == 0, 0), "attention_mask": mask, "labels": _ids(g, seq=TARGET)}


def _vision_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g),
        "labels": torch.randint(0, CLASSES, (BATCH,), generator=g),
    }


def _speech_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(BATCH, 8, 16, generator=g), "labels": _ids(g, seq=TARGET)}


def _decoder(**extra) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        **SPECIAL,
    )
    cfg.update(extra)
    return cfg


def _bert(**extra) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    cfg.update(extra)
    return cfg


def _specs() -> dict:
    """name -> (config class, model class, config kwargs, kind, explicit positions)."""
    import transformers as tf

    causal, positions = "causal", _arange_positions()
    s2s = dict(
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        vocab_size=VOCAB,
        decoder_start_token_id=1,
        **SPECIAL,
    )
    return {
        "gpt2": (
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, **SPECIAL),
            causal,
            positions,
        ),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _decoder(num_key_value_heads=2), causal, positions),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, _decoder(num_key_value_heads=2), causal, positions),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, _decoder(num_key_value_heads=2), causal, positions),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, _decoder(num_key_value_heads=2, head_dim=8), causal, positions),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, _decoder(num_key_value_heads=1, head_dim=8), causal, positions),
        "gemma3": (
            tf.Gemma3TextConfig,
            tf.Gemma3ForCausalLM,
            _decoder(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8),
            causal,
            positions,
        ),
        "phi": (tf.PhiConfig, tf.PhiForCausalLM, _decoder(partial_rotary_factor=0.5), causal, positions),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, _decoder(num_key_value_heads=2), causal, positions),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, _decoder(rotary_pct=0.5), causal, positions),
        "opt": (
            tf.OPTConfig,
            tf.OPTForCausalLM,
            dict(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                ffn_dim=FFN,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                word_embed_proj_dim=HIDDEN,
                max_position_embeddings=64,
                **SPECIAL,
            ),
            causal,
            positions,
        ),
        "starcoder2": (
            tf.Starcoder2Config,
            tf.Starcoder2ForCausalLM,
            _decoder(num_key_value_heads=2),
            causal,
            positions,
        ),
        "falcon": (  # multi-query attention: key/value with one head
            tf.FalconConfig,
            tf.FalconForCausalLM,
            dict(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                multi_query=True,
                new_decoder_architecture=False,
                **SPECIAL,
            ),
            causal,
            positions,
        ),
        "bert": (tf.BertConfig, tf.BertForSequenceClassification, _bert(), "encoder", positions),
        # RoBERTa numbers positions from the padding (per example already): nothing is shared.
        "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification, _bert(pad_token_id=1), "encoder", None),
        "distilbert": (  # shares (1, seq) position ids and takes no position_ids argument
            tf.DistilBertConfig,
            tf.DistilBertForSequenceClassification,
            dict(
                vocab_size=VOCAB,
                dim=HIDDEN,
                n_layers=LAYERS,
                n_heads=HEADS,
                hidden_dim=FFN,
                max_position_embeddings=64,
                num_labels=CLASSES,
                pad_token_id=0,
            ),
            "encoder",
            None,
        ),
        "vit": (
            tf.ViTConfig,
            tf.ViTForImageClassification,
            dict(
                image_size=16,
                patch_size=4,
                num_channels=3,
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=FFN,
                num_labels=CLASSES,
            ),
            "vision",
            None,
        ),
        "whisper": (
            tf.WhisperConfig,
            tf.WhisperForConditionalGeneration,
            dict(
                num_mel_bins=8,
                max_source_positions=8,
                max_target_positions=32,
                suppress_tokens=None,
                begin_suppress_tokens=None,
                **s2s,
            ),
            "speech",
            None,
        ),
        # BART's decoder shares 1-D position ids (no argument takes per-example ones)
        "bart": (
            tf.BartConfig,
            tf.BartForConditionalGeneration,
            dict(max_position_embeddings=64, **s2s),
            "seq2seq",
            None,
        ),
        "t5": (
            tf.T5Config,
            tf.T5ForConditionalGeneration,
            dict(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                d_kv=8,
                d_ff=FFN,
                num_layers=LAYERS,
                num_heads=HEADS,
                relative_attention_num_buckets=8,
                decoder_start_token_id=1,
                **SPECIAL,
            ),
            "seq2seq",
            None,
        ),
    }


_INPUTS = {
    "causal": _causal_inputs,
    "encoder": _encoder_inputs,
    "seq2seq": _seq2seq_inputs,
    "vision": _vision_inputs,
    "speech": _speech_inputs,
}


def build(name: str, seed: int = 0) -> Arch:
    """A fresh tiny model of architecture ``name``: float32, eval mode, dropout off, random weights from ``seed``."""
    config_cls, model_cls, kwargs, kind, positions = _specs()[name]
    config = config_cls(**kwargs)
    for key, value in config.to_dict().items():  # every dropout probability to 0: runs compare exactly
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    return Arch(name, model, kind, _INPUTS[kind], kind in ("causal", "seq2seq", "speech"), positions)
