"""Initialisers for adapter factors, matching PEFT's conventions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype=jnp.float32) -> jax.Array:
  """torch's ``kaiming_uniform_(w, a=sqrt(5))``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

  This is the default init of torch's ``nn.Linear`` and the one PEFT uses for
  LoRA A and for MoSLoRA's Kaiming mixer.
  """
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def orthogonal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Orthogonal square matrices ``[..., r, r]`` with ``MᵀM = I``, each one on its own.

  (``jax.nn.initializers.orthogonal`` on ``[L, r, r]`` would orthogonalise one
  ``[L·r, r]`` matrix instead, so the leading dims get a key each.)
  """
  *stack, rows, cols = shape
  init = jax.nn.initializers.orthogonal()
  keys = jax.random.split(key, math.prod(stack))
  mats = jax.vmap(lambda k: init(k, (rows, cols), dtype))(keys)
  return mats.reshape(shape)


def lora_factors(
    key: jax.Array,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    fan_in: int,
    mode,
    dtype,
    *,
    embedding: bool,
) -> tuple[jax.Array, jax.Array]:
  """Initial (A, B) for one adapter; ``mode`` is ``LoraConfig.init_lora_weights``.

  Linear-like layers (PEFT): A Kaiming-uniform (``True``) or normal with std
  ``1/r`` (``"gaussian"``, PEFT's ``normal_(std=1/r)``), B zero. Embeddings
  (PEFT): A zero, B standard normal.
  ``False`` draws both at random, a debugging aid: the adapted model then
  differs from the base model from the first step.
  """
  key_a, key_b = jax.random.split(key)
  rank = a_shape[-1]
  if mode is False:
    return (kaiming_uniform(key_a, a_shape, fan_in, dtype),
            kaiming_uniform(key_b, b_shape, rank, dtype))
  if embedding:
    return jnp.zeros(a_shape, dtype), jax.random.normal(key_b, b_shape, dtype)
  if mode == "gaussian":
    a = jax.random.normal(key_a, a_shape, dtype) / rank
  else:
    a = kaiming_uniform(key_a, a_shape, fan_in, dtype)
  return a, jnp.zeros(b_shape, dtype)
