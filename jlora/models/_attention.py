"""Masks, norms and the attention kernel shared by every model family.

Attention runs through ``jax.nn.dot_product_attention`` with the default
implementation (cuDNN on GPU where it applies, XLA elsewhere); GQA is native
there (key/value heads divide query heads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def attention_mask(key_valid: jax.Array, query_slots: jax.Array, num_keys: int,
                   sliding_window: int | None = None) -> jax.Array:
  """Boolean ``[B, 1, T, S]``: query at cache slot ``query_slots [T]`` may see key slot ``s``.

  A key is visible when it is valid (``key_valid [B, S]``, not padding), not in
  the future, and (with a sliding window) fewer than ``sliding_window`` slots
  back. Each query also sees itself, so padded rows stay finite.
  """
  keys = jnp.arange(num_keys)
  q = query_slots[:, None]
  visible = keys[None, :] <= q
  if sliding_window is not None:
    visible &= q - keys[None, :] < sliding_window
  mask = visible[None] & key_valid[:, None, :].astype(bool)
  mask |= keys[None, None, :] == q[None]
  return mask[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
           scale: float | None = None) -> jax.Array:
  """``q [B, T, H, D]``, ``k, v [B, S, K, D]`` → ``[B, T, H, D]``.

  ``mask=None`` means plain causal attention over unpadded rows, which runs
  as cuDNN's fused flash attention on GPU (bf16/fp16); an explicit mask
  (padding, a cache, a sliding window) takes XLA's path.
  """
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                        implementation=_fused_implementation(q))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def _fused_implementation(q: jax.Array) -> str | None:
  """``"cudnn"`` where cuDNN's flash attention takes these inputs, else None (XLA)."""
  head_dim = q.shape[-1]
  if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
      and head_dim <= 128 and head_dim % 8 == 0):
    return "cudnn"
  return None


def needs_mask(attention_mask, cache, sliding_window: int | None) -> bool:
  """Whether a call needs an explicit mask, or plain causal attention will do."""
  return attention_mask is not None or cache is not None or sliding_window is not None


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"hidden_act={name!r} is not supported; use one of {', '.join(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class RMSNorm(nnx.Module):
  """HF's RMSNorm: normalise in float32, cast back, then scale by ``weight``."""

  def __init__(self, size: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((size,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
  """``torch.nn.LayerNorm`` with ``weight`` and ``bias`` (statistics in float32)."""

  def __init__(self, size: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((size,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((size,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
