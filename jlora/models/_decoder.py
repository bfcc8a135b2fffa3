"""The Llama family (llama incl. Llama-3 rope scaling, mistral, qwen2, qwen3), and the scanned stack every family runs.

Attribute names mirror HF's ``LlamaForCausalLM`` so PEFT target names and
checkpoint keys carry over: ``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,down}_proj``,
``model.norm``, ``lm_head``. The N layers are one module built with
``nnx.vmap`` (every parameter has a leading layer axis) and run with
``nnx.scan``, so compile time does not grow with depth.

The family registers itself (``register_family``) at the end of this module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.models import _cache
from jlora.models._attention import AttentionMask, RMSNorm, activation, attend, build_mask, segment_positions
from jlora.models._cache import KVCache
from jlora.models._config import LlamaConfig, hf_get, hf_json, layer_windows, refuse_options
from jlora.models._family import Family, register_family
from jlora.models._language_model import LanguageModel, check_scan_unroll
from jlora.models._remat import placement, rematerialized, saved
from jlora.models._rope import apply_rope, check_rope, freeze, rope_cos_sin, rope_parameters
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


def scan_layers(layers: nnx.Module, h: jax.Array, cache: KVCache | None, mask: AttentionMask, *args,
                remat: str = "none", unroll: int = 1):
  """Run the stacked ``layers`` over ``h``; each layer is called ``layer(h, kv, mask, *args)``.

  ``kv`` is that layer's ``(k, v)`` slice of the cache (None without one);
  ``mask`` is the call's ``AttentionMask``: when its layers differ
  (``mask.layer_kinds``), each layer's index into its static table is
  scanned alongside the layer's weights and set on the layer's mask, so one
  traced body serves every layer.
  ``remat`` names what the backward pass keeps (``jlora.models.REMAT_POLICIES``).
  ``unroll`` layers run per step of the loop (``jax.lax.scan``'s ``unroll``; at
  least the number of layers: no loop at all). Unrolling lets XLA fuse and
  schedule across layer boundaries and write saved residuals without a
  dynamic-update-slice per step, at the price of a longer compile; results are
  the same up to floating-point rounding.
  Under a mesh placement (``jlora.models.placed``) ``h`` stays split
  over the batch and each layer's weights are gathered inside the body.
  Returns ``(h, (k, v) stacked over layers or None)``.
  """
  kv = None if cache is None else (cache.k, cache.v)
  kinds = jnp.asarray(mask.layer_kinds, jnp.int32) if mask.layer_kinds else None
  call = rematerialized(lambda layer, h, kv, *args: layer(h, kv, *args), remat)
  where = placement()
  pin = (lambda x: x) if where is None else where.activations

  @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, None) + (None,) * len(args), out_axes=(nnx.Carry, 0),
            unroll=check_scan_unroll(unroll))
  def run(h, layer, kv, kind, mask, *args):
    h, kv = call(layer, pin(h), kv, mask if kind is None else mask.replace(layer=kind), *args)
    return pin(h), kv

  return run(h, layers, kv, kinds, mask, *args)


def self_attention(q, k, v, kv, mask, index, scale=None):
  """Attend with ``q, k, v [B, T, heads, D]``, first writing k, v into the cache slice ``kv``."""
  if kv is not None:
    k, v = kv = _cache.write(kv[0], kv[1], k, v, index)
  return attend(q, k, v, mask, scale), kv


class Attention(nnx.Module):
  """q/k/v/o projections, optional q/k norms, rope and attention; a family varies the class attributes."""

  norm: type = RMSNorm
  """The q/k norm's class (built as ``norm(head_dim, eps, **dtypes)``)."""

  def __init__(self, c: LlamaConfig, dtypes: dict, rngs: nnx.Rngs):
    heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.q_proj = linear(c.hidden_size, heads * d, c.attention_bias, dtypes, rngs)
    self.k_proj = linear(c.hidden_size, kv_heads * d, c.attention_bias, dtypes, rngs)
    self.v_proj = linear(c.hidden_size, kv_heads * d, c.attention_bias, dtypes, rngs)
    self.o_proj = linear(heads * d, c.hidden_size, self.out_bias(c), dtypes, rngs)
    if c.qk_norm:
      self.q_norm = self.norm(d, c.norm_eps, **dtypes)
      self.k_norm = self.norm(d, c.norm_eps, **dtypes)
    self.qk_norm = c.qk_norm
    self.shape = (heads, kv_heads, d)
    self.scale = self.logit_scale(c)

  @staticmethod
  def out_bias(c) -> bool:
    """Whether ``o_proj`` has a bias."""
    return c.o_proj_bias

  @staticmethod
  def logit_scale(c) -> float | None:
    """The attention logits' scale; None is ``head_dim ** -0.5``."""
    return None

  def __call__(self, h, kv, mask, cos, sin, index):
    heads, kv_heads, d = self.shape
    b, t, _ = h.shape
    q, k, v = (saved(y) for y in lora_projections((self.q_proj, self.k_proj, self.v_proj), h))
    q, k, v = q.reshape(b, t, heads, d), k.reshape(b, t, kv_heads, d), v.reshape(b, t, kv_heads, d)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, kv = self_attention(q, k, v, kv, mask, index, self.scale)
    return self.o_proj(out.reshape(b, t, heads * d)), kv


class Mlp(nnx.Module):
  def __init__(self, c: LlamaConfig, dtypes: dict, rngs: nnx.Rngs):
    self.gate_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtypes, rngs)
    self.up_proj = linear(c.hidden_size, c.intermediate_size, c.mlp_bias, dtypes, rngs)
    self.down_proj = linear(c.intermediate_size, c.hidden_size, c.mlp_bias, dtypes, rngs)
    self.act = c.hidden_act

  def __call__(self, h):
    gate, up = (saved(y) for y in lora_projections((self.gate_proj, self.up_proj), h))
    return self.down_proj(activation(self.act)(gate) * up)


class DecoderLayer(nnx.Module):
  """Pre-norm residual block; a family with other projections passes its own ``attention`` and ``mlp`` classes."""

  def __init__(self, c: LlamaConfig, dtypes: dict, rngs: nnx.Rngs, attention: type = Attention, mlp: type = Mlp):
    self.self_attn = attention(c, dtypes, rngs)
    self.mlp = mlp(c, dtypes, rngs)
    self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps, **dtypes)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps, **dtypes)

  def __call__(self, h, kv, mask, cos, sin, index):
    attn, kv = self.self_attn(self.input_layernorm(h), kv, mask, cos, sin, index)
    h = h + attn
    return h + self.mlp(self.post_attention_layernorm(h)), kv


class DecoderModel(nnx.Module):
  def __init__(self, c: LlamaConfig, dtypes: dict, rngs: nnx.Rngs, layer: type = DecoderLayer):
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs,
                                  embedding_init=nnx.initializers.normal(0.02), **dtypes)
    self.layers = stacked(lambda r: layer(c, dtypes, r), c.num_hidden_layers, rngs)
    self.norm = RMSNorm(c.hidden_size, c.norm_eps, **dtypes)


def base_embed(embed: nnx.Module) -> nnx.Embed:
  """The ``nnx.Embed`` itself, also when a LoRA layer wraps it."""
  return getattr(embed, "base_layer", embed)


def prepare(model: LanguageModel, input_ids, attention_mask, positions, cache, segment_ids):
  """Positions, the ``AttentionMask`` and the ``(new valid, index)`` cache fields of one call.

  Positions default to ``0..T-1`` continuing from the cache, or, with
  ``segment_ids``, restart at 0 with every segment. The mask carries each
  layer's attention settings (``model.config.layer_attention()``).
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
  mask = build_mask(attention_mask, cache, key_valid, query_slots, segment_ids, model.config.layer_attention(),
                    model.attention, t, model.max_segments)
  return positions, mask, new_valid, index


def with_cache(cache: KVCache | None, kv, new_valid, length: int):
  if cache is None:
    return None
  return KVCache(kv[0], kv[1], new_valid, cache.index + length)


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

  ``mlp_class`` (a class attribute) is every layer's feed-forward block;
  subclasses swap it (a sparse mixture of experts).
  """

  mlp_class: type = Mlp

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: str = "matmuls", attention: str = "auto",
               scan_unroll: int = 1):
    rngs = rngs or nnx.Rngs(0)
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    self._settings(config, dtype, remat, attention, scan_unroll)
    self.model = DecoderModel(config, dtypes, rngs, self.layer_class())
    if not config.tie_word_embeddings:
      self.lm_head = linear(config.hidden_size, config.vocab_size, False, dtypes, rngs)

  @classmethod
  def layer_class(cls) -> Callable[..., nnx.Module]:
    """The decoder layer this model stacks: ``DecoderLayer`` with ``mlp_class`` as its feed-forward block
    (a family with other projections overrides it)."""
    return functools.partial(DecoderLayer, mlp=cls.mlp_class)

  def head(self, h):
    """Logits ``[..., vocab]`` of hidden states ``h [..., hidden]`` (the tied embedding or ``lm_head``)."""
    if self.config.tie_word_embeddings:
      return base_embed(self.model.embed_tokens).attend(h)
    return self.lm_head(h)

  @property
  def tied_output_head(self) -> str | None:
    """The embedding module the output head reads when tied (``model.embed_tokens``), else None."""
    return "model.embed_tokens" if self.config.tie_word_embeddings else None

  def untie_output_head(self) -> None:
    """Give a tied model its own ``lm_head``: a copy of the (base) input embedding, so the outputs are
    unchanged, and ``tie_word_embeddings=False`` from now on (what ``save_pretrained`` writes).

    Adapters call this when the head must differ from the embedding: ``modules_to_save=["lm_head"]``
    (PEFT copies the tied head) and merging LoRA on ``embed_tokens`` (the head keeps the base table).
    """
    if not self.config.tie_word_embeddings:
      return
    table = base_embed(self.model.embed_tokens).embedding
    head = nnx.eval_shape(lambda: nnx.Linear(self.config.hidden_size, self.config.vocab_size, use_bias=False,
                                             dtype=self.dtype, param_dtype=table.dtype, rngs=nnx.Rngs(0)))
    head.kernel = nnx.Param(jnp.asarray(table[...]).T)
    self.lm_head = head
    self.config = dataclasses.replace(self.config, tie_word_embeddings=False)

  def _hidden(self, input_ids, attention_mask, positions, cache, segment_ids):
    positions, mask, new_valid, index = prepare(self, input_ids, attention_mask, positions, cache, segment_ids)
    cos, sin = rope_cos_sin(self.config.rope_parameters, positions, head_dim=self.config.head_dim,
                            max_position_embeddings=self.config.max_position_embeddings)
    h = self.model.embed_tokens(input_ids)
    h, kv = scan_layers(self.model.layers, h, cache, mask, cos, sin, index, remat=self.remat,
                        unroll=self.scan_unroll)
    return self.model.norm(h), with_cache(cache, kv, new_valid, input_ids.shape[1])


NO_SOFT_CAPS = {
    "attn_logit_softcapping": "remove it from config.json (only Gemma 2 soft-caps attention logits).",
    "final_logit_softcapping": "remove it from config.json (only Gemma 2 and 3 soft-cap the final logits)."}
"""Soft-capping options a family without soft-caps refuses, each with its fix."""


def llama_config_from_hf(hf) -> LlamaConfig:
  """The ``LlamaConfig`` of a transformers llama / mistral / qwen2 / qwen3 config.

  Every rope type of ``jlora.models._rope.ROPE_TYPES`` is read (with
  ``partial_rotary_factor``); Qwen's ``use_sliding_window`` slides the layers
  ``layer_types`` marks (those from ``max_window_layers`` on). Raises
  ValueError for options the family does not implement.
  """
  model_type = hf.model_type
  refuse_options(hf, model_type, NO_SOFT_CAPS)
  heads = hf.num_attention_heads
  head_dim = hf_get(hf, "head_dim", default=hf.hidden_size // heads)
  rope = rope_parameters(hf.to_dict())
  check_rope(rope, head_dim, hf.max_position_embeddings)
  windowed = model_type.startswith("qwen") and getattr(hf, "use_sliding_window", False)
  layer_types = tuple(getattr(hf, "layer_types", None) or ()) if windowed else ()
  sliding_window = getattr(hf, "sliding_window", None) if model_type == "mistral" or windowed else None
  if layer_types:
    layer_windows(layer_types, sliding_window)
  bias = bool(getattr(hf, "attention_bias", False)) or model_type == "qwen2"
  return LlamaConfig(
      model_type=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
      num_attention_heads=heads, num_key_value_heads=hf_get(hf, "num_key_value_heads", default=heads),
      head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
      hidden_act=hf.hidden_act, tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=False)),
      attention_bias=bias, o_proj_bias=bool(getattr(hf, "attention_bias", False)),
      mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=model_type == "qwen3",
      sliding_window=sliding_window, rope=freeze(rope), layer_types=layer_types, hf_json=hf_json(hf))


LLAMA = register_family(Family(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), from_hf=llama_config_from_hf,
    model_class=CausalLM, ignored_tensors=(r".*rotary_emb\.inv_freq$",),
    sharding_rules=((r"(^|\.)(q_proj|k_proj|v_proj)$", ("embed", "heads")),
                    (r"(^|\.)(gate_proj|up_proj)$", ("embed", "mlp")),
                    (r"(^|\.)(o_proj)$", ("heads", "embed")),
                    (r"(^|\.)(down_proj)$", ("mlp", "embed")),
                    (r"(^|\.)(embed_tokens)$", ("vocab", "embed")),
                    (r"(^|\.)(lm_head)$", ("embed", "vocab")))))
