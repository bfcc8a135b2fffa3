"""The key/value cache that generation threads through the scanned layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
  """Keys and values of every layer, filled left to right.

  Attributes:
    k, v: ``[layers, B, S, kv_heads, head_dim]``.
    valid: ``[B, S]`` bool, True where a slot holds a real (non-padding) token.
    index: int32 scalar, the next slot to write.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, config, batch: int, length: int, dtype) -> "KVCache":
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))

  @property
  def length(self) -> int:
    return self.k.shape[2]


def write(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array):
  """One layer's ``[B, S, K, D]`` cache with ``k, v [B, T, K, D]`` written at slot ``index``."""
  start = (0, index, 0, 0)
  return (jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start),
          jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start))


def step_inputs(cache: KVCache | None, attention_mask: jax.Array, length: int):
  """``(key_valid [B, S], query_slots [T], new cache fields)`` for a call with ``length`` tokens."""
  if cache is None:
    return attention_mask.astype(bool), jnp.arange(length), None
  valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(bool), (0, cache.index))
  return valid, cache.index + jnp.arange(length), valid
