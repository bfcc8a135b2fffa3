"""The Gemma family: Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3_text``, ``Gemma3ForCausalLM``).

A Llama-shaped decoder with HF's Gemma names and math:

- RMSNorm stored as an offset: the scale is ``1 + weight``, applied in
  float32 and cast once (``OffsetRMSNorm``);
- embeddings times ``sqrt(hidden_size)``, that factor first rounded to the
  activation dtype (bf16: ``sqrt(3072)`` becomes 55.5), as transformers does;
- norms before and after attention and the MLP (``input_layernorm``,
  ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
  ``post_feedforward_layernorm``), GeGLU (``hidden_activation``);
- attention scaled by ``query_pre_attn_scalar ** -0.5``; Gemma 2 soft-caps
  attention logits (``attn_logit_softcapping``) and both soft-cap the final
  logits (``final_logit_softcapping``, inside ``head`` so the chunked loss and
  generation see capped logits);
- ``layer_types`` alternate sliding-window and global layers; Gemma 3 adds
  per-head q/k norms and rotates its sliding layers with a second rope table
  (``rope_local_base_freq``), its global ones with the (possibly scaled)
  global table.

Per-layer windows, soft-caps and rope tables travel through the scan as each
layer's ``LayerAttention`` (one compiled layer body).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.models._attention import activation
from jlora.models._config import (FamilyConfig, LayerAttention, hf_get, hf_json, layer_windows,
                                  refuse_options)
from jlora.models._decoder import LLAMA, Attention, base_embed, linear, prepare, scan_layers, stacked, with_cache
from jlora.models._family import Family, register_family
from jlora.models._language_model import LanguageModel
from jlora.models._remat import saved
from jlora.models._rope import check_rope, freeze, rope_cos_sin, rope_parameters
from jlora.nn import lora_projections


@dataclasses.dataclass(frozen=True)
class GemmaConfig(FamilyConfig):
  """Gemma 2 / Gemma 3 text switches.

  ``rope``: the global layers' rope (a frozen standard dict, see
  ``jlora.models._rope``); ``local_rope``: the sliding layers' rope when it
  differs (Gemma 3), else ``()``. ``layer_types``: one
  ``"sliding_attention"``/``"full_attention"`` per layer.
  """

  attention_bias: bool = False
  qk_norm: bool = False
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  rope: tuple = ()
  local_rope: tuple = ()

  def layer_attention(self) -> tuple[LayerAttention, ...]:
    windows = layer_windows(self.layer_types, self.sliding_window)
    local = 1 if self.local_rope else 0
    return tuple(LayerAttention(window, self.attn_logit_softcapping, local if kind == "sliding_attention" else 0)
                 for window, kind in zip(windows, self.layer_types))

  def rope_tables(self) -> tuple[dict, ...]:
    """The rope dicts the layers index by ``LayerAttention.rope_table`` (global first)."""
    return tuple(dict(r) for r in (self.rope, self.local_rope) if r)


class OffsetRMSNorm(nnx.Module):
  """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)`` in float32, cast once; ``weight`` is stored as the offset."""

  def __init__(self, size: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.zeros((size,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(self.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(x / cap)`` in ``x``'s dtype; ``x`` itself when ``cap`` is None."""
  return x if cap is None else (jnp.tanh(x / cap) * cap).astype(x.dtype)


def embed_scale(hidden_size: int, dtype) -> jax.Array:
  """Scalar ``sqrt(hidden_size)``, rounded to float32 and then to ``dtype`` (transformers' rounding)."""
  return jnp.asarray(np.float32(hidden_size ** 0.5)).astype(dtype)


class GemmaAttention(Attention):
  """Llama's attention with ``(1 + w)`` q/k norms, a biased ``o_proj`` when the others are, and
  ``query_pre_attn_scalar ** -0.5`` as the logits' scale."""

  norm = OffsetRMSNorm

  @staticmethod
  def out_bias(c) -> bool:
    return c.attention_bias

  @staticmethod
  def logit_scale(c) -> float:
    return float(c.query_pre_attn_scalar) ** -0.5


class GemmaMlp(nnx.Module):
  def __init__(self, c: GemmaConfig, dtypes: dict, rngs: nnx.Rngs):
    self.gate_proj = linear(c.hidden_size, c.intermediate_size, False, dtypes, rngs)
    self.up_proj = linear(c.hidden_size, c.intermediate_size, False, dtypes, rngs)
    self.down_proj = linear(c.intermediate_size, c.hidden_size, False, dtypes, rngs)
    self.act = c.hidden_act

  def __call__(self, h):
    gate, up = (saved(y) for y in lora_projections((self.gate_proj, self.up_proj), h))
    return self.down_proj(activation(self.act)(gate) * up)


class GemmaDecoderLayer(nnx.Module):
  def __init__(self, c: GemmaConfig, dtypes: dict, rngs: nnx.Rngs):
    self.self_attn = GemmaAttention(c, dtypes, rngs)
    self.mlp = GemmaMlp(c, dtypes, rngs)
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
      setattr(self, name, OffsetRMSNorm(c.hidden_size, c.norm_eps, **dtypes))

  def __call__(self, h, kv, mask, cos, sin, index):
    """``cos, sin [R, B, T, rot]``: the model's rope tables; the layer takes ``mask.rope_index()``."""
    table = mask.rope_index()
    cos, sin = cos[table], sin[table]
    attn, kv = self.self_attn(self.input_layernorm(h), kv, mask, cos, sin, index)
    h = h + self.post_attention_layernorm(attn)
    return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), kv


class GemmaModel(nnx.Module):
  def __init__(self, c: GemmaConfig, dtypes: dict, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs,
                                  embedding_init=nnx.initializers.normal(0.02), **dtypes)
    self.layers = stacked(lambda r: GemmaDecoderLayer(c, dtypes, r), c.num_hidden_layers, rngs)
    self.norm = OffsetRMSNorm(c.hidden_size, c.norm_eps, **dtypes)


class GemmaForCausalLM(LanguageModel):
  """Gemma 2 / Gemma 3 text causal LM: ``input_ids [B, T]`` → logits ``[B, T, vocab]`` (soft-capped if the config says).

  Same call, attributes and settings as ``jlora.models.CausalLM``.
  Soft-capped attention runs on kernels that cap: splash (TPU), tokamax
  (GPU), or materialised logits on CPU and for cached/padded calls.
  """

  def __init__(self, config: GemmaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: str = "matmuls", attention: str = "auto",
               scan_unroll: int = 1):
    rngs = rngs or nnx.Rngs(0)
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    self._settings(config, dtype, remat, attention, scan_unroll)
    self.model = GemmaModel(config, dtypes, rngs)
    if not config.tie_word_embeddings:
      self.lm_head = linear(config.hidden_size, config.vocab_size, False, dtypes, rngs)

  def head(self, h):
    """Logits ``[..., vocab]`` of ``h [..., hidden]`` (tied table or ``lm_head``), soft-capped."""
    if self.config.tie_word_embeddings:
      logits = base_embed(self.model.embed_tokens).attend(h)
    else:
      logits = self.lm_head(h)
    return soft_cap(logits, self.config.final_logit_softcapping)

  def _hidden(self, input_ids, attention_mask, positions, cache, segment_ids):
    c = self.config
    positions, mask, new_valid, index = prepare(self, input_ids, attention_mask, positions, cache, segment_ids)
    tables = [rope_cos_sin(r, positions, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings)
              for r in c.rope_tables()]
    cos, sin = jnp.stack([t[0] for t in tables]), jnp.stack([t[1] for t in tables])
    h = self.model.embed_tokens(input_ids)
    h = h * embed_scale(c.hidden_size, h.dtype)
    h, kv = scan_layers(self.model.layers, h, cache, mask, cos, sin, index, remat=self.remat,
                        unroll=self.scan_unroll)
    return self.model.norm(h), with_cache(cache, kv, new_valid, input_ids.shape[1])


_REFUSED = {
    "use_bidirectional_attention": "jlora trains causal LMs; set it to false (or remove it) in config.json.",
    "attention_dropout": "jlora has no attention dropout; set it to 0.0 in config.json.",
}


def gemma_config_from_hf(hf) -> GemmaConfig:
  """The ``GemmaConfig`` of a transformers ``Gemma2Config`` or ``Gemma3TextConfig``.

  Raises ValueError for options jlora does not implement: bidirectional
  attention, attention dropout, layer types other than sliding/full, and
  Gemma 3's ``attn_logit_softcapping`` (transformers' Gemma 3 ignores it, so
  honouring it would not match the checkpoint's own model).
  """
  model_type = hf.model_type
  gemma3 = model_type == "gemma3_text"
  refusals = dict(_REFUSED)
  if gemma3:
    refusals["attn_logit_softcapping"] = ("transformers' Gemma 3 ignores it, so jlora refuses rather than "
                                          "diverge; remove it from config.json.")
  refuse_options(hf, model_type, refusals)
  heads = hf.num_attention_heads
  head_dim = hf_get(hf, "head_dim", default=hf.hidden_size // heads)
  layer_types = tuple(hf.layer_types)
  raw = hf.to_dict()
  if gemma3:
    rope, local = rope_parameters(raw, "full_attention"), rope_parameters(raw, "sliding_attention")
  else:
    rope, local = rope_parameters(raw), {}
  for r in (rope, local):
    if r:
      check_rope(r, head_dim, hf.max_position_embeddings)
  window = getattr(hf, "sliding_window", None)
  layer_windows(layer_types, window)
  return GemmaConfig(
      model_type=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
      num_attention_heads=heads, num_key_value_heads=hf_get(hf, "num_key_value_heads", default=heads),
      head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
      hidden_act=hf_get(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
      tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=True)),
      attention_bias=bool(getattr(hf, "attention_bias", False)), qk_norm=gemma3,
      query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
      attn_logit_softcapping=None if gemma3 else hf_get(hf, "attn_logit_softcapping"),
      final_logit_softcapping=hf_get(hf, "final_logit_softcapping"), sliding_window=window,
      layer_types=layer_types, rope=freeze(rope), local_rope=freeze(local) if local != rope else (),
      hf_json=hf_json(hf))


GEMMA = register_family(Family(
    name="gemma", model_types=("gemma2", "gemma3_text"), from_hf=gemma_config_from_hf,
    model_class=GemmaForCausalLM, ignored_tensors=LLAMA.ignored_tensors, sharding_rules=LLAMA.sharding_rules))
