"""Tiny ``jlora.models`` built from configs, and packed batches, for the attention and loss tests.

``tiny_llama`` has GQA (4 query heads over 2 key/value heads); ``tiny_gpt2``
is the GPT-2 family. ``packed_batch`` packs a few records of known lengths
into rows with ``jlora.train._data.pack``, exactly as training does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora
from jlora.models import CausalLM, Gpt2LMHeadModel, ModelConfig
from jlora.models._attention import causal_mask
from jlora.nn import LoraParam
from jlora.train._data import pack
from jlora.train._steps import batch_nll, split_model

VOCAB = 61


def tiny_llama(*, seed: int = 0, head_dim: int = 8, dtype=jnp.float32, attention: str = "auto",
               **overrides) -> CausalLM:
  """A 2-layer Llama-family model; ``overrides`` are ``ModelConfig`` fields (e.g. ``sliding_window``)."""
  heads = overrides.pop("num_attention_heads", 4)
  config = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
                       max_position_embeddings=512, rope=(("rope_theta", 10000.0), ("rope_type", "default")))
  return CausalLM(dataclasses.replace(config, **overrides), dtype=dtype, rngs=nnx.Rngs(seed), attention=attention)


def tiny_gpt2(*, seed: int = 0) -> Gpt2LMHeadModel:
  config = ModelConfig(model_type="gpt2", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=512, norm_eps=1e-5, hidden_act="gelu_new",
                       tie_word_embeddings=True, attention_bias=True, o_proj_bias=True, mlp_bias=True)
  return Gpt2LMHeadModel(config, rngs=nnx.Rngs(seed))


def with_lora(model, targets=("q_proj", "v_proj", "c_attn", "lm_head", "embed_tokens", "wte")):
  """``model`` with a randomly initialised LoRA (so adapters change the outputs), targets that exist."""
  names = {".".join(map(str, p)).split(".")[-1] for p, _ in nnx.iter_graph(model)}
  present = [t for t in targets if t in names]
  return jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=present, init_lora_weights=False))


def records(lengths, seed: int = 0) -> list[tuple[list[int], list[int]]]:
  """``(ids, loss_mask)`` examples of the given lengths; each masks out its first two tokens (a prompt)."""
  rng = np.random.default_rng(seed)
  return [(rng.integers(1, VOCAB, n).tolist(), [0, 0] + [1] * (n - 2)) for n in lengths]


def packed_batch(lengths, seq_len: int, seed: int = 0) -> dict:
  """The records of ``lengths`` packed into rows of ``seq_len`` (as arrays the steps take)."""
  rows = pack(records(lengths, seed), seq_len, pad_id=0, packing=True)
  return {k: jnp.asarray(v) for k, v in rows.batch().items()}


def single_batches(lengths, seed: int = 0) -> list[dict]:
  """Each record of ``lengths`` alone in a row of its own length."""
  return [{k: jnp.asarray(v) for k, v in pack([r], len(r[0]), pad_id=0, packing=False).batch().items()}
          for r in records(lengths, seed)]


def assert_same_loss_and_lora_grads(model, batch: dict, attention: str, reference: str = "xla") -> None:
  """``model``'s mean token loss on ``batch`` and its LoRA gradients agree under two attention kernels."""
  results = {}
  for impl in (attention, reference):
    model.attention = impl
    graphdef, params, rng, frozen = split_model(model)

    def loss(p):
      total, count = batch_nll(nnx.merge(graphdef, p, rng, frozen, copy=True), batch)
      return total / count

    results[impl] = jax.value_and_grad(loss)(params)
  (loss_a, grads_a), (loss_r, grads_r) = results[attention], results[reference]
  np.testing.assert_allclose(float(loss_a), float(loss_r), rtol=1e-5)
  for ga, gr in zip(jax.tree.leaves(nnx.state(grads_a, LoraParam)), jax.tree.leaves(nnx.state(grads_r, LoraParam))):
    np.testing.assert_allclose(ga, gr, rtol=1e-3, atol=1e-6)


def random_qkv(batch: int, t: int, heads: int = 4, kv_heads: int = 2, d: int = 8):
  """``q [batch, t, heads, d]``, ``k, v [batch, t, kv_heads, d]``, standard normal (GQA by default)."""
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kq, (batch, t, heads, d)), jax.random.normal(kk, (batch, t, kv_heads, d)),
          jax.random.normal(kv, (batch, t, kv_heads, d)))


def assert_matches_masked_attention(attention, q, k, v, segments=None, window=None) -> None:
  """``attention(q, k, v)`` and its q/k/v gradients equal XLA's attention under the same causal mask."""
  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=causal_mask(q.shape[1], segments, window))

  np.testing.assert_allclose(attention(q, k, v), xla(q, k, v), atol=1e-5)
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v) for f in (attention, xla)]
  for g_kernel, g_xla in zip(*grads):
    np.testing.assert_allclose(g_kernel, g_xla, atol=1e-4)
