"""Llama-family decoder (llama incl. Llama-3 rope scaling, mistral, qwen2, qwen3).

Attribute names mirror HF's ``LlamaForCausalLM`` so PEFT target names and
checkpoint keys carry over: ``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,down}_proj``,
``model.norm``, ``lm_head``. The N layers are one module built with
``nnx.vmap`` (every parameter has a leading layer axis) and run with
``nnx.scan``, so compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.models import _cache
from jlora.models._attention import RMSNorm, activation, attend, build_mask, check_attention, segment_positions
from jlora.models._cache import KVCache
from jlora.models._config import ModelConfig
from jlora.models._remat import check_remat, placement, rematerialized, saved
from jlora.models._rope import apply_rope, cos_sin, inverse_frequencies
from jlora.models._token_ids import check_token_ids
from jlora.nn import lora_projections, mark_stacked


def linear(d_in: int, d_out: int, bias: bool, dtypes: dict, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02), **dtypes)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """``num_layers`` copies of ``make(rngs)`` stacked on a leading axis, marked for targeting."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0)
  def build(rngs: nnx.Rngs) -> nnx.Module:
    return make(rngs)

  return mark_stacked(build(rngs), num_layers)


def check_scan_unroll(unroll: int) -> int:
  """``unroll`` if it is a positive int (layers per step of the layer loop), else ValueError with the fix."""
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    raise ValueError(
        f"scan_unroll={unroll!r} is not a positive number of layers per loop step; use 1 (a rolled loop, "
        "the shortest compile), a small number such as 2, or the number of layers to unroll the loop fully.")
  return unroll


def scan_layers(layers: nnx.Module, h: jax.Array, cache: KVCache | None, *args, remat: str = "none",
                unroll: int = 1):
  """Run the stacked ``layers`` over ``h``; each layer is called ``layer(h, kv, *args)``.

  ``kv`` is that layer's ``(k, v)`` slice of the cache (None without one);
  ``remat`` names what the backward pass keeps (``jlora.models.REMAT_POLICIES``).
  ``unroll`` layers run per step of the loop (``jax.lax.scan``'s ``unroll``; at
  least the number of layers: no loop at all). Unrolling lets XLA fuse and
  schedule across layer boundaries and write saved residuals without a
  dynamic-update-slice per step, at the price of a longer compile; results are
  the same up to floating-point rounding.
  Under a mesh placement (``jlora.models._remat.placed``) ``h`` stays split
  over the batch and each layer's weights are gathered inside the body.
  Returns ``(h, (k, v) stacked over layers or None)``.
  """
  kv = None if cache is None else (cache.k, cache.v)
  call = rematerialized(lambda layer, h, kv, *args: layer(h, kv, *args), remat)
  where = placement()
  pin = (lambda x: x) if where is None else where.activations

  @nnx.scan(in_axes=(nnx.Carry, 0, 0) + (None,) * len(args), out_axes=(nnx.Carry, 0),
            unroll=check_scan_unroll(unroll))
  def run(h, layer, kv, *args):
    h, kv = call(layer, pin(h), kv, *args)
    return pin(h), kv

  return run(h, layers, kv, *args)


def self_attention(q, k, v, kv, mask, index, scale=None):
  """Attend with ``q, k, v [B, T, heads, D]``, first writing k, v into the cache slice ``kv``."""
  if kv is not None:
    k, v = kv = _cache.write(kv[0], kv[1], k, v, index)
  return attend(q, k, v, mask, scale), kv


class Attention(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.q_proj = linear(c.hidden_size, heads * d, c.attention_bias, dtypes, rngs)
    self.k_proj = linear(c.hidden_size, kv_heads * d, c.attention_bias, dtypes, rngs)
    self.v_proj = linear(c.hidden_size, kv_heads * d, c.attention_bias, dtypes, rngs)
    self.o_proj = linear(heads * d, c.hidden_size, c.o_proj_bias, dtypes, rngs)
    if c.qk_norm:
      self.q_norm = RMSNorm(d, c.norm_eps, **dtypes)
      self.k_norm = RMSNorm(d, c.norm_eps, **dtypes)
    self.qk_norm = c.qk_norm
    self.shape = (heads, kv_heads, d)

  def __call__(self, h, kv, mask, cos, sin, index):
    heads, kv_heads, d = self.shape
    b, t, _ = h.shape
    q, k, v = (saved(y) for y in lora_projections((self.q_proj, self.k_proj, self.v_proj), h))
    q, k, v = q.reshape(b, t, heads, d), k.reshape(b, t, kv_heads, d), v.reshape(b, t, kv_heads, d)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, kv = self_attention(q, k, v, kv, mask, index)
    return self.o_proj(out.reshape(b, t, heads * d)), kv


class Mlp(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    self.gate_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtypes, rngs)
    self.up_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtypes, rngs)
    self.down_proj = linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtypes, rngs)
    self.act = c.hidden_act

  def __call__(self, h):
    gate, up = (saved(y) for y in lora_projections((self.gate_proj, self.up_proj), h))
    return self.down_proj(activation(self.act)(gate) * up)


class DecoderLayer(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    self.self_attn = Attention(c, dtypes, rngs)
    self.mlp = Mlp(c, dtypes, rngs)
    self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps, **dtypes)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps, **dtypes)

  def __call__(self, h, kv, mask, cos, sin, index):
    attn, kv = self.self_attn(self.input_layernorm(h), kv, mask, cos, sin, index)
    h = h + attn
    return h + self.mlp(self.post_attention_layernorm(h)), kv


class DecoderModel(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs,
                                  embedding_init=nnx.initializers.normal(0.02), **dtypes)
    self.layers = stacked(lambda r: DecoderLayer(c, dtypes, r), c.num_hidden_layers, rngs)
    self.norm = RMSNorm(c.hidden_size, c.norm_eps, **dtypes)


def base_embed(embed: nnx.Module) -> nnx.Embed:
  """The ``nnx.Embed`` itself, also when a LoRA layer wraps it."""
  return getattr(embed, "base_layer", embed)


def prepare(model: nnx.Module, input_ids, attention_mask, positions, cache, segment_ids):
  """Positions, the ``AttentionMask`` and the ``(new valid, index)`` cache fields of one call.

  Positions default to ``0..T-1`` continuing from the cache, or, with
  ``segment_ids``, restart at 0 with every segment.
  """
  b, t = input_ids.shape
  if positions is None:
    if segment_ids is not None:
      positions = segment_positions(segment_ids)
    else:
      start = 0 if cache is None else cache.index
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  mask_2d = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
  key_valid, query_slots, new_valid = _cache.step_inputs(cache, mask_2d, t)
  index = jnp.zeros((), jnp.int32) if cache is None else cache.index
  mask = build_mask(attention_mask, cache, key_valid, query_slots, segment_ids,
                    getattr(model.config, "sliding_window", None), model.attention, t,
                    getattr(model, "max_segments", None))
  return positions, mask, new_valid, index


def with_cache(cache: KVCache | None, kv, new_valid, length: int):
  if cache is None:
    return None
  return KVCache(kv[0], kv[1], new_valid, cache.index + length)


class LanguageModel(nnx.Module):
  """The call every causal LM family shares; a family supplies ``_hidden`` and ``head``.

  ``model(ids, ...)`` is ``head(hidden(ids, ...))``, and with ``cache=`` it
  returns ``(logits, new_cache)``. ``_hidden(input_ids, attention_mask,
  positions, cache, segment_ids)`` returns ``(h [B, T, hidden], new_cache)``.

  ``max_segments`` (an attribute; ``jlora.train`` sets it from its packed
  rows) is the most records a packed row holds, None when unknown; it picks
  how cuDNN runs packed rows (``jlora.models._attention.cudnn_packed_layout``).
  """

  max_segments: int | None = None

  def __call__(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
               segment_ids=None):
    check_token_ids(input_ids, self.config.vocab_size)
    h, new_cache = self._hidden(input_ids, attention_mask, positions, cache, segment_ids)
    logits = self.head(h)
    return logits if cache is None else (logits, new_cache)

  def hidden(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
    """Final hidden states ``[B, T, hidden]`` (after the last norm), without the output head."""
    check_token_ids(input_ids, self.config.vocab_size)
    return self._hidden(input_ids, attention_mask, positions, None, segment_ids)[0]


class CausalLM(LanguageModel):
  """Llama-family causal LM: ``input_ids [B, T]`` → logits ``[B, T, vocab]``.

  ``model(ids, attention_mask=None, positions=None)`` returns logits;
  with ``cache=`` (a ``KVCache``) it returns ``(logits, new_cache)``.
  Positions default to ``0..T-1`` (continuing from the cache), like HF's
  forward; pass ``positions`` for left-padded batches. ``remat`` (an
  attribute, settable later) names what training keeps for the backward
  pass: ``"none"``, ``"matmuls"`` or ``"full"`` (see ``jlora.models._remat``).
  ``scan_unroll`` (an attribute too) is how many layers run per step of the
  layer loop (1: a rolled loop; the layer count: fully unrolled, see
  ``scan_layers``).

  Packed rows: ``segment_ids [B, T]`` (int, one id per record, padding its
  own id) keep attention within each record and restart the default
  positions at 0 with each record. ``attention`` (an attribute too) picks
  the kernel: ``"auto"``, ``"xla"``, ``"cudnn"``, ``"splash"``,
  ``"splash_interpret"``, ``"tokamax"`` or ``"tokamax_xla"``
  (``jlora.models._attention``).

  ``model.hidden(ids, ...)`` returns the final hidden states ``[B, T, hidden]``
  and ``model.head(h)`` their logits, so a loss can run the output head
  chunk by chunk.
  """

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: str = "matmuls", attention: str = "auto",
               scan_unroll: int = 1):
    rngs = rngs or nnx.Rngs(0)
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    self.config = config
    self.dtype = dtype
    self.remat = check_remat(remat)
    self.scan_unroll = check_scan_unroll(scan_unroll)
    self.attention = check_attention(attention)
    self.model = DecoderModel(config, dtypes, rngs)
    if not config.tie_word_embeddings:
      self.lm_head = linear(config.hidden_size, config.vocab_size, False, dtypes, rngs)
    self.inv_freq = tuple(float(f) for f in inverse_frequencies(config.head_dim, config.rope_parameters))

  def head(self, h):
    """Logits ``[..., vocab]`` of hidden states ``h [..., hidden]`` (the tied embedding or ``lm_head``)."""
    if self.config.tie_word_embeddings:
      return base_embed(self.model.embed_tokens).attend(h)
    return self.lm_head(h)

  def _hidden(self, input_ids, attention_mask, positions, cache, segment_ids):
    positions, mask, new_valid, index = prepare(self, input_ids, attention_mask, positions, cache, segment_ids)
    cos, sin = cos_sin(positions, jnp.asarray(self.inv_freq, jnp.float32))
    h = self.model.embed_tokens(input_ids)
    h, kv = scan_layers(self.model.layers, h, cache, mask, cos, sin, index, remat=self.remat,
                        unroll=self.scan_unroll)
    return self.model.norm(h), with_cache(cache, kv, new_valid, input_ids.shape[1])
