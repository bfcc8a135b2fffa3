"""GPT-2 with HF's names: ``transformer.{wte, wpe, h.N.{ln_1, attn.{c_attn, c_proj}, ln_2,
mlp.{c_fc, c_proj}}, ln_f}`` and a tied ``lm_head``.

HF's ``Conv1D`` stores weights ``[in, out]``, which is ``nnx.Linear``'s kernel
layout, so checkpoints load without a transpose.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jlora.models._attention import LayerNorm, activation, check_attention
from jlora.models._config import ModelConfig
from jlora.models._remat import check_remat, saved
from jlora.models._decoder import (base_embed, check_scan_unroll, linear, prepare, scan_layers, self_attention,
                                   stacked, with_cache)
from jlora.models._cache import KVCache


class Gpt2Attention(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    self.c_attn = linear(c.hidden_size, 3 * c.hidden_size, True, dtypes, rngs)
    self.c_proj = linear(c.hidden_size, c.hidden_size, True, dtypes, rngs)
    self.shape = (c.num_attention_heads, c.head_dim)

  def __call__(self, h, kv, mask, index):
    heads, d = self.shape
    b, t, _ = h.shape
    q, k, v = (x.reshape(b, t, heads, d) for x in jnp.split(saved(self.c_attn(h)), 3, axis=-1))
    out, kv = self_attention(q, k, v, kv, mask, index)
    return self.c_proj(out.reshape(b, t, heads * d)), kv


class Gpt2Mlp(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    self.c_fc = linear(c.hidden_size, c.intermediate_size, True, dtypes, rngs)
    self.c_proj = linear(c.intermediate_size, c.hidden_size, True, dtypes, rngs)
    self.act = c.hidden_act

  def __call__(self, h):
    return self.c_proj(activation(self.act)(saved(self.c_fc(h))))


class Gpt2Block(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(c.hidden_size, c.norm_eps, **dtypes)
    self.attn = Gpt2Attention(c, dtypes, rngs)
    self.ln_2 = LayerNorm(c.hidden_size, c.norm_eps, **dtypes)
    self.mlp = Gpt2Mlp(c, dtypes, rngs)

  def __call__(self, h, kv, mask, index):
    attn, kv = self.attn(self.ln_1(h), kv, mask, index)
    h = h + attn
    return h + self.mlp(self.ln_2(h)), kv


class Gpt2Transformer(nnx.Module):
  def __init__(self, c: ModelConfig, dtypes: dict, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(c.vocab_size, c.hidden_size, embedding_init=init, rngs=rngs, **dtypes)
    self.wpe = nnx.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init, rngs=rngs, **dtypes)
    self.h = stacked(lambda r: Gpt2Block(c, dtypes, r), c.num_hidden_layers, rngs)
    self.ln_f = LayerNorm(c.hidden_size, c.norm_eps, **dtypes)


class Gpt2LMHeadModel(nnx.Module):
  """GPT-2 causal LM: ``input_ids [B, T]`` → logits ``[B, T, vocab]``.

  The same call as ``CausalLM`` (``segment_ids``, ``attention``, ``scan_unroll``, ``hidden`` / ``head``).
  """

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: str = "matmuls", attention: str = "auto",
               scan_unroll: int = 1):
    rngs = rngs or nnx.Rngs(0)
    self.config = config
    self.dtype = dtype
    self.remat = check_remat(remat)
    self.scan_unroll = check_scan_unroll(scan_unroll)
    self.attention = check_attention(attention)
    self.transformer = Gpt2Transformer(config, dict(dtype=dtype, param_dtype=param_dtype), rngs)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
               segment_ids=None):
    h, new_cache = self._hidden(input_ids, attention_mask, positions, cache, segment_ids)
    logits = self.head(h)
    return logits if cache is None else (logits, new_cache)

  def hidden(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
    """Final hidden states ``[B, T, hidden]`` (after ``ln_f``), without the output head."""
    return self._hidden(input_ids, attention_mask, positions, None, segment_ids)[0]

  def head(self, h):
    """Logits ``[..., vocab]`` of hidden states (the tied ``wte``)."""
    return base_embed(self.transformer.wte).attend(h)

  def _hidden(self, input_ids, attention_mask, positions, cache, segment_ids):
    positions, mask, new_valid, index = prepare(self, input_ids, attention_mask, positions, cache, segment_ids)
    t = self.transformer
    h = t.wte(input_ids) + t.wpe(positions)
    h, kv = scan_layers(t.h, h, cache, mask, index, remat=self.remat, unroll=self.scan_unroll)
    return t.ln_f(h), with_cache(cache, kv, new_valid, input_ids.shape[1])
