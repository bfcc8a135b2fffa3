"""GPT-2 with HF's names: ``transformer.{wte, wpe, h.N.{ln_1, attn.{c_attn, c_proj}, ln_2,
mlp.{c_fc, c_proj}}, ln_f}`` and a tied ``lm_head``.

HF's ``Conv1D`` stores weights ``[in, out]``, which is ``nnx.Linear``'s kernel
layout, so checkpoints load without a transpose (and PEFT adapters of GPT-2
are ``fan_in_fan_out``). The family registers itself at the end of this module.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jlora.models._attention import LayerNorm, activation
from jlora.models._config import FamilyConfig, hf_json
from jlora.models._decoder import base_embed, linear, prepare, scan_layers, self_attention, stacked, with_cache
from jlora.models._family import Family, register_family
from jlora.models._language_model import LanguageModel
from jlora.models._remat import saved


@dataclasses.dataclass(frozen=True)
class Gpt2Config(FamilyConfig):
  """GPT-2's config: the shared sizes only (every projection has a bias, the head is tied)."""


class Gpt2Attention(nnx.Module):
  def __init__(self, c: FamilyConfig, dtypes: dict, rngs: nnx.Rngs):
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
  def __init__(self, c: FamilyConfig, dtypes: dict, rngs: nnx.Rngs):
    self.c_fc = linear(c.hidden_size, c.intermediate_size, True, dtypes, rngs)
    self.c_proj = linear(c.intermediate_size, c.hidden_size, True, dtypes, rngs)
    self.act = c.hidden_act

  def __call__(self, h):
    return self.c_proj(activation(self.act)(saved(self.c_fc(h))))


class Gpt2Block(nnx.Module):
  def __init__(self, c: FamilyConfig, dtypes: dict, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(c.hidden_size, c.norm_eps, **dtypes)
    self.attn = Gpt2Attention(c, dtypes, rngs)
    self.ln_2 = LayerNorm(c.hidden_size, c.norm_eps, **dtypes)
    self.mlp = Gpt2Mlp(c, dtypes, rngs)

  def __call__(self, h, kv, mask, index):
    attn, kv = self.attn(self.ln_1(h), kv, mask, index)
    h = h + attn
    return h + self.mlp(self.ln_2(h)), kv


class Gpt2Transformer(nnx.Module):
  def __init__(self, c: FamilyConfig, dtypes: dict, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(c.vocab_size, c.hidden_size, embedding_init=init, rngs=rngs, **dtypes)
    self.wpe = nnx.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init, rngs=rngs, **dtypes)
    self.h = stacked(lambda r: Gpt2Block(c, dtypes, r), c.num_hidden_layers, rngs)
    self.ln_f = LayerNorm(c.hidden_size, c.norm_eps, **dtypes)


class Gpt2LMHeadModel(LanguageModel):
  """GPT-2 causal LM: ``input_ids [B, T]`` → logits ``[B, T, vocab]``.

  The same call as ``CausalLM`` (``segment_ids``, ``attention``, ``scan_unroll``, ``hidden`` / ``head``).
  """

  def __init__(self, config: FamilyConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: str = "matmuls", attention: str = "auto",
               scan_unroll: int = 1):
    rngs = rngs or nnx.Rngs(0)
    self._settings(config, dtype, remat, attention, scan_unroll)
    self.transformer = Gpt2Transformer(config, dict(dtype=dtype, param_dtype=param_dtype), rngs)

  def head(self, h):
    """Logits ``[..., vocab]`` of hidden states (the tied ``wte``)."""
    return base_embed(self.transformer.wte).attend(h)

  def _hidden(self, input_ids, attention_mask, positions, cache, segment_ids):
    positions, mask, new_valid, index = prepare(self, input_ids, attention_mask, positions, cache, segment_ids)
    t = self.transformer
    h = t.wte(input_ids) + t.wpe(positions)
    h, kv = scan_layers(t.h, h, cache, mask, index, remat=self.remat, unroll=self.scan_unroll)
    return t.ln_f(h), with_cache(cache, kv, new_valid, input_ids.shape[1])


def gpt2_config_from_hf(hf) -> Gpt2Config:
  """The ``Gpt2Config`` of a transformers ``GPT2Config``; ValueError for options jlora does not implement."""
  for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
    if getattr(hf, option, False):
      raise ValueError(f"gpt2 with {option}=True is not supported; set it to false in config.json.")
  if not getattr(hf, "scale_attn_weights", True):
    raise ValueError("gpt2 with scale_attn_weights=False is not supported; set it to true in config.json.")
  hidden = hf.n_embd
  return Gpt2Config(
      model_type="gpt2", vocab_size=hf.vocab_size, hidden_size=hidden,
      intermediate_size=hf.n_inner or 4 * hidden, num_hidden_layers=hf.n_layer,
      num_attention_heads=hf.n_head, num_key_value_heads=hf.n_head,
      head_dim=hidden // hf.n_head, max_position_embeddings=hf.n_positions,
      norm_eps=hf.layer_norm_epsilon, hidden_act=hf.activation_function,
      tie_word_embeddings=True, hf_json=hf_json(hf))


def gpt2_checkpoint_names(tensors: dict) -> dict:
  """Checkpoints saved from ``GPT2Model`` lack the ``transformer.`` prefix; add it."""
  if any(k.startswith("transformer.") for k in tensors):
    return dict(tensors)
  return {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in tensors.items()}


GPT2 = register_family(Family(
    name="gpt2", model_types=("gpt2",), from_hf=gpt2_config_from_hf, model_class=Gpt2LMHeadModel,
    transpose_kernels=False, checkpoint_names=gpt2_checkpoint_names,
    ignored_tensors=(r".*\.attn\.(masked_)?bias$",), fan_in_fan_out=True,
    sharding_rules=((r"(^|\.)(c_attn)$", ("embed", "heads")),
                    (r"(^|\.)(c_fc)$", ("embed", "mlp")),
                    (r"(^|\.)(c_proj)$", ("heads", "embed")),
                    (r"(^|\.)(wte)$", ("vocab", "embed")),
                    (r"(^|\.)(lm_head)$", ("embed", "vocab")))))
