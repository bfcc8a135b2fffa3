"""Rotary position embeddings as HF computes them (``default`` and ``llama3``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, rope: dict) -> np.ndarray:
  """``[head_dim // 2]`` float32 inverse frequencies, Llama-3 scaling applied if asked."""
  base = float(rope.get("rope_theta", 10000.0))
  dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  if rope.get("rope_type", "default") != "llama3":
    return inv_freq
  factor = float(rope["factor"])
  low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
  old_context = float(rope["original_max_position_embeddings"])
  low_wavelen, high_wavelen = old_context / low, old_context / high
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """``cos, sin [B, T, head_dim]`` (float32) for integer ``positions [B, T]``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate ``x [B, T, heads, head_dim]`` (HF's rotate-half convention)."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
