"""Packed rows: where each record (run of equal segment ids) starts, and positions within records."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array) -> jax.Array:
  """``[B, T]`` bool: True where a run of equal ids begins."""
  return jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                         axis=1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """``[B, T]`` int32 positions that restart at 0 where the segment id changes."""
  t = jnp.arange(segment_ids.shape[1])
  return (t - jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, 0), axis=1)).astype(jnp.int32)
