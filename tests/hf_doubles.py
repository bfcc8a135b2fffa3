"""Tiny random transformers models of every supported family, saved to a temp dir."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jlora

VOCAB = 61
_COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "llama_tied": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **_COMMON, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8)),
    "llama_bias": lambda: transformers.LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=3, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8, tie_word_embeddings=True),
    "qwen2_sliding": lambda: transformers.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=3,
                                                      max_window_layers=1, tie_word_embeddings=False),
    "llama_linear_rope": lambda: transformers.LlamaConfig(**_COMMON, rope_scaling=dict(rope_type="linear", factor=4.0)),
    "llama_yarn_rope": lambda: transformers.LlamaConfig(
        **_COMMON, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    "llama_dynamic_rope": lambda: transformers.LlamaConfig(
        **{**_COMMON, "max_position_embeddings": 4}, rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "gemma2": lambda: transformers.Gemma2Config(
        **_COMMON, head_dim=8, query_pre_attn_scalar=6, sliding_window=3, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, tie_word_embeddings=True),
    "gemma2_untied": lambda: transformers.Gemma2Config(
        **{**_COMMON, "num_hidden_layers": 3}, head_dim=8, sliding_window=4, tie_word_embeddings=False),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **{**_COMMON, "num_hidden_layers": 3}, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
        sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4, final_logit_softcapping=3.0,
        rope_scaling=dict(rope_type="linear", factor=8.0), tie_word_embeddings=True),
    "phi3": lambda: transformers.Phi3Config(
        **{**_COMMON, "max_position_embeddings": 16, "hidden_size": 32}, original_max_position_embeddings=4,
        sliding_window=5, partial_rotary_factor=0.5, tie_word_embeddings=False, pad_token_id=0,
        rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.3], long_factor=[2.0, 3.5])),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4,
                                            n_positions=64, bos_token_id=0, eos_token_id=0),
}


def hf_model(family: str, seed: int = 0) -> torch.nn.Module:
  """A random transformers model of ``family``, weights large enough that attention matters."""
  torch.manual_seed(seed)
  config = CONFIGS[family]()
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.25)
  return model


def save(family: str, path, seed: int = 0, **save_kwargs) -> torch.nn.Module:
  model = hf_model(family, seed)
  model.save_pretrained(str(path), **save_kwargs)
  return model


def logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long),
                attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)))
  return out.logits.float().numpy()


def batch(batch: int = 2, length: int = 7, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, mask)``; the last row is left-padded by two tokens."""
  ids = np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[-1, :2] = 0
  return ids, mask


def jlora_model(path):
  """The checkpoint at ``path`` loaded by jlora in float32 (the precision the oracle tests compare at)."""
  return jlora.from_pretrained(path, dtype=jnp.float32)
