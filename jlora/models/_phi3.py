"""The Phi-3 family (``phi3``: Phi-3, Phi-3.5, Phi-4-mini): Llama with fused projections.

HF's names are kept, so checkpoints round-trip byte for byte and PEFT
adapters target the fused modules as PEFT does: ``self_attn.qkv_proj``
(``[hidden] → [(H + 2K) · head_dim]``, rows q | k | v) and
``mlp.gate_up_proj`` (``[hidden] → [2 · intermediate]``, rows gate | up).
A LoRA on a fused projection is one adapter on the whole fused output, as in
PEFT; the output is split after the adapter is added. Rope may be partial
(``partial_rotary_factor``) and ``longrope`` (short factors up to
``original_max_position_embeddings`` positions, long factors beyond);
``sliding_window`` applies to every layer.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jlora.models._attention import activation
from jlora.models._config import LlamaConfig, hf_get, hf_json, refuse_options
from jlora.models._decoder import NO_SOFT_CAPS, CausalLM, DecoderLayer, linear, self_attention
from jlora.models._family import Family, register_family
from jlora.models._remat import saved
from jlora.models._rope import apply_rope, check_rope, freeze, rope_parameters


@dataclasses.dataclass(frozen=True)
class Phi3Config(LlamaConfig):
  """Phi-3's config: the Llama switches (rope may be partial and ``longrope``; one window on every layer)."""


class Phi3Attention(nnx.Module):
  def __init__(self, c: Phi3Config, dtypes: dict, rngs: nnx.Rngs):
    heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.qkv_proj = linear(c.hidden_size, (heads + 2 * kv_heads) * d, False, dtypes, rngs)
    self.o_proj = linear(heads * d, c.hidden_size, False, dtypes, rngs)
    self.shape = (heads, kv_heads, d)

  def __call__(self, h, kv, mask, cos, sin, index):
    heads, kv_heads, d = self.shape
    b, t, _ = h.shape
    qkv = saved(self.qkv_proj(h))
    q = qkv[..., : heads * d].reshape(b, t, heads, d)
    k = qkv[..., heads * d: (heads + kv_heads) * d].reshape(b, t, kv_heads, d)
    v = qkv[..., (heads + kv_heads) * d:].reshape(b, t, kv_heads, d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, kv = self_attention(q, k, v, kv, mask, index)
    return self.o_proj(out.reshape(b, t, heads * d)), kv


class Phi3Mlp(nnx.Module):
  def __init__(self, c: Phi3Config, dtypes: dict, rngs: nnx.Rngs):
    self.gate_up_proj = linear(c.hidden_size, 2 * c.intermediate_size, False, dtypes, rngs)
    self.down_proj = linear(c.intermediate_size, c.hidden_size, False, dtypes, rngs)
    self.act = c.hidden_act
    self.size = c.intermediate_size

  def __call__(self, h):
    gate_up = saved(self.gate_up_proj(h))
    gate, up = gate_up[..., : self.size], gate_up[..., self.size:]
    return self.down_proj(up * activation(self.act)(gate))


class Phi3DecoderLayer(DecoderLayer):
  def __init__(self, c: Phi3Config, dtypes: dict, rngs: nnx.Rngs):
    super().__init__(c, dtypes, rngs, attention=Phi3Attention, mlp=Phi3Mlp)


class Phi3ForCausalLM(CausalLM):
  """Phi-3 causal LM; the call, head and settings are ``CausalLM``'s, the layers Phi-3's fused ones.

  ``longrope`` picks its table per call from the largest position (as
  transformers' forward does); transformers' ``generate`` instead re-encodes
  the whole sequence once it first passes the original length, so cached
  generation across that boundary differs from it.
  """

  @classmethod
  def layer_class(cls) -> type:
    return Phi3DecoderLayer


def phi3_config_from_hf(hf) -> Phi3Config:
  """The ``Phi3Config`` of a transformers ``Phi3Config`` (rope: ``default`` or ``longrope``, maybe partial)."""
  refuse_options(hf, hf.model_type, {
      **NO_SOFT_CAPS,
      "attention_dropout": "jlora has no attention dropout; set it to 0.0 in config.json."})
  heads = hf.num_attention_heads
  head_dim = hf_get(hf, "head_dim", default=hf.hidden_size // heads)
  rope = rope_parameters(hf.to_dict())
  check_rope(rope, head_dim, hf.max_position_embeddings)
  return Phi3Config(
      model_type=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
      num_attention_heads=heads, num_key_value_heads=hf_get(hf, "num_key_value_heads", default=heads),
      head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
      hidden_act=hf.hidden_act, tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=False)),
      sliding_window=getattr(hf, "sliding_window", None), rope=freeze(rope), hf_json=hf_json(hf))


PHI3 = register_family(Family(
    name="phi3", model_types=("phi3",), from_hf=phi3_config_from_hf, model_class=Phi3ForCausalLM,
    ignored_tensors=(r".*rotary_emb\.inv_freq$",),
    # The fused kernels interleave q | k | v (gate | up) blocks along their output: shard them over the input only.
    sharding_rules=((r"(^|\.)(o_proj)$", ("heads", "embed")),
                    (r"(^|\.)(down_proj)$", ("mlp", "embed")),
                    (r"(^|\.)(embed_tokens)$", ("vocab", "embed")),
                    (r"(^|\.)(lm_head)$", ("embed", "vocab")))))
