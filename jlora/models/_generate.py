"""Autoregressive generation with a KV cache: one prefill, then a scanned decode step.

Everything after the prompt runs inside one ``jax.jit``: the prompt fills the
cache, then ``lax.scan`` samples a token and feeds it back
``max_new_tokens`` times. Greedy decoding (``temperature=0``) equals
transformers' ``generate(do_sample=False)``.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.models._cache import KVCache
from jlora.models._language_model import LanguageModel
from jlora.models._token_ids import check_token_ids


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Next token ``[B]`` from logits ``[B, V]``: argmax at temperature 0, else nucleus sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "eos_token_id", "cached"))
def _generate(graphdef, state, ids, mask, key, *, max_new_tokens, temperature, top_p, eos_token_id, cached):
  """The decode loop. ``cached``: a ``LanguageModel`` fed one token per step through its KV cache;
  else any ``model(ids, attention_mask=...)``, rerun per step over a fixed ``[B, T + max_new_tokens]`` buffer."""
  model = nnx.merge(graphdef, state)
  model.eval()  # inference: no LoRA dropout (this copy only; the caller's model is untouched)
  batch, length = ids.shape
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  if cached:
    memory = KVCache.zeros(model.config, batch, length + max_new_tokens, model.dtype)
    logits, memory = model(ids, attention_mask=mask, positions=positions, cache=memory)
  else:
    pad = ((0, 0), (0, max_new_tokens))
    memory = (jnp.pad(ids, pad), jnp.pad(mask, pad))
    logits = model(memory[0], attention_mask=memory[1])[:, :length]
  ones = jnp.ones((batch, 1), jnp.int32)

  def step(carry, inputs):
    state, last_logits, memory, position, done = carry
    slot, step_key = inputs
    token = sample_token(last_logits, step_key, temperature, top_p)
    if eos_token_id is not None:
      token = jnp.where(done, eos_token_id, token)
      done = done | (token == eos_token_id)
    position = position + 1
    model = nnx.merge(graphdef, state)  # carried, so its variables live at this trace level
    model.eval()
    if cached:
      logits, memory = model(token[:, None], attention_mask=ones, positions=position[:, None], cache=memory)
      last = logits[:, -1]
    else:
      memory = (memory[0].at[:, slot].set(token), memory[1].at[:, slot].set(1))
      last = jnp.take(model(memory[0], attention_mask=memory[1]), slot, axis=1)
    return (state, last, memory, position, done), token

  init = (state, logits[:, -1], memory, positions[:, -1], jnp.zeros((batch,), bool))
  slots = length + jnp.arange(max_new_tokens)
  _, tokens = jax.lax.scan(step, init, (slots, jax.random.split(key, max_new_tokens)))
  return jnp.concatenate([ids, tokens.T], axis=1)


def generate(model: nnx.Module, input_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, attention_mask=None,
             eos_token_id: int | None = None, use_cache: bool = True) -> jax.Array:
  """Continue ``input_ids [B, T]`` by ``max_new_tokens`` tokens.

  A ``jlora.models.LanguageModel`` decodes through its KV cache (one token
  per step); any other model ``model(ids [B, T], attention_mask=...) ->
  logits`` is rerun over the whole fixed-size buffer each step (no cache:
  fine for a few short samples; left padding then shifts its positions).

  Args:
    model: a ``jlora.models`` model (LoRA-adapted or not), or a causal LM of your own.
    input_ids: int prompt ids ``[B, T]``; left-pad ragged prompts.
    temperature: 0 for greedy, else the softmax temperature.
    top_p: nucleus sampling mass (1.0 keeps every token).
    seed: PRNG seed; the same seed gives the same samples.
    attention_mask: ``[B, T]`` 1 for real tokens, 0 for (left) padding.
    eos_token_id: once a row emits it, the row's remaining tokens are it too.
    use_cache: decode a ``LanguageModel`` through its KV cache (False: rerun
      the forward pass per token, as for other models).

  Returns:
    ``[B, T + max_new_tokens]`` int32: the prompt followed by the new tokens.
  """
  ids = jnp.asarray(input_ids, jnp.int32)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
  if not 0.0 <= temperature < math.inf:
    raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"Need 0 < top_p <= 1, got {top_p}.")
  cached = isinstance(model, LanguageModel) and use_cache
  check_token_ids(ids, getattr(getattr(model, "config", None), "vocab_size", None))
  mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}.")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, ids, mask, jax.random.key(seed), max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_p=float(top_p), eos_token_id=eos_token_id, cached=cached)
