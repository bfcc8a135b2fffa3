"""Adapter state for one wrapped layer: a LoRA (or MoSLoRA) adapter, and WLoRA.

An adapter owns only arrays; the layer-type specific math (how x meets A, how
A and B form a kernel-shaped delta) comes from the ``LoraLayer`` it lives in,
passed in as ``ops``. Arrays carry the base kernel's stack dims in front (a
scanned model slices them per layer), so shapes below read
``[*stack, ...]``; inside a scanned call ``stack`` is empty.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.nn._variables import LoraBuffer, LoraParam, LoraRngKey


class LayerOps(Protocol):
  """The layer-type math an adapter needs (implemented by ``LoraLayer``)."""

  b_rank_axis: int

  def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array: ...
  def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array: ...
  def factors_to_weight(self, a: jax.Array, b: jax.Array) -> jax.Array: ...


def over_stack(fn, stack_ndim: int):
  """``fn`` mapped over ``stack_ndim`` leading axes of every argument."""
  for _ in range(stack_ndim):
    fn = jax.vmap(fn)
  return fn


def _broadcast_stack(values: jax.Array, target_ndim: int) -> jax.Array:
  """Reshape ``[*stack]`` values so they broadcast against a ``[*stack, ...]`` array."""
  return values.reshape(values.shape + (1,) * (target_ndim - values.ndim))


class LoraAdapter(nnx.Module):
  """One LoRA adapter of one layer: ``delta(x) = x·A·[M]·B · scaling``.

  Attributes:
    lora_A: ``[*stack, *a_shape, r]`` (rank last).
    lora_B: ``[*stack, *b_shape]`` with the rank at ``ops.b_rank_axis``.
    lora_mixer: MoSLoRA's ``[*stack, r, r]`` mixer, or None for plain LoRA.
    scaling: ``[*stack]``; 0 where ``layers_to_transform`` leaves a layer out.
    rank_mask: ``[*stack, r]`` ones for the live rank of each stacked layer,
      or None when every layer uses the full rank (``rank_pattern`` and
      ``layers_to_transform`` over scanned layers need it).
  """

  def __init__(
      self,
      lora_A: jax.Array,
      lora_B: jax.Array,
      scaling: jax.Array,
      *,
      rank_mask: jax.Array | None = None,
      mixer: jax.Array | None = None,
      dropout: float = 0.0,
      dropout_key: jax.Array | None = None,
      param_type: type[LoraParam] = LoraParam,
  ):
    self.lora_A = param_type(lora_A)
    self.lora_B = param_type(lora_B)
    self.lora_mixer = param_type(mixer) if mixer is not None else None
    self.scaling = LoraBuffer(jnp.asarray(scaling, jnp.float32))
    self.rank_mask = LoraBuffer(rank_mask) if rank_mask is not None else None
    self.dropout_rate = float(dropout)
    self.deterministic = False
    if dropout > 0.0:
      stack = self.scaling.shape
      keys = jax.random.split(dropout_key, stack) if stack else dropout_key
      self.dropout_key = LoraRngKey(jax.random.key_data(keys))
      self.dropout_count = LoraRngKey(jnp.zeros(stack, jnp.uint32))
    else:
      self.dropout_key = self.dropout_count = None

  @property
  def rank(self) -> int:
    return self.lora_A.shape[-1]

  def _dropout(self, x: jax.Array) -> jax.Array:
    if self.dropout_key is None or self.deterministic:
      return x
    key = jax.random.fold_in(jax.random.wrap_key_data(self.dropout_key[...]), self.dropout_count[...])
    self.dropout_count[...] = self.dropout_count[...] + 1
    keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)

  def delta(self, ops: LayerOps, x: jax.Array, dtype, *, dropout: bool = True) -> jax.Array:
    """The adapter's additive output for input ``x`` (unstacked call)."""
    if dropout:
      x = self._dropout(x)
    h = ops.project_in(x, self.lora_A[...].astype(dtype))
    if self.rank_mask is not None:
      h = h * self.rank_mask[...].astype(dtype)
    if self.lora_mixer is not None:
      h = h @ self.lora_mixer[...].astype(dtype)
    y = ops.project_out(h, self.lora_B[...].astype(dtype))
    return y * self.scaling[...].astype(dtype)

  def lora_factors(self, ops: LayerOps) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain-LoRA factors ``(A', B, scaling)`` with the same delta as this adapter.

    The rank mask and the MoSLoRA mixer are folded into ``A' = (A ⊙ mask)·M``,
    which is exact; export and weighted combination build on this.
    """
    stack_ndim = self.scaling.ndim

    def fold(a, mask, mixer):
      if mask is not None:
        a = a * mask
      if mixer is not None:
        a = a @ mixer
      return a

    mask = self.rank_mask[...] if self.rank_mask is not None else None
    mixer = self.lora_mixer[...] if self.lora_mixer is not None else None
    a = over_stack(fold, stack_ndim)(self.lora_A[...], mask, mixer)
    return a, self.lora_B[...], self.scaling[...]


class WLoraAdapter(nnx.Module):
  """WLoRA: ``delta(x) = Σ_k softmax(logits)_k · upstream_k.delta(x)``.

  Attributes:
    upstreams: K frozen ``LoraAdapter`` (their arrays are ``UpstreamLoraParam``).
    logits: ``[*stack, K]``, the only trainable arrays; zero at init, i.e.
      equal weights 1/K.
  """

  def __init__(self, upstreams: list[LoraAdapter], logits: jax.Array):
    self.upstreams = nnx.List(upstreams)
    self.logits = LoraParam(logits)

  @property
  def rank(self) -> int:
    return sum(u.rank for u in self.upstreams)

  def weights(self) -> jax.Array:
    """The softmax-normalised combination weights ``[*stack, K]``."""
    return jax.nn.softmax(self.logits[...].astype(jnp.float32), axis=-1)

  def delta(self, ops: LayerOps, x: jax.Array, dtype, *, dropout: bool = True) -> jax.Array:
    weights = self.weights().astype(dtype)
    total = None
    for k, upstream in enumerate(self.upstreams):
      term = weights[..., k] * upstream.delta(ops, x, dtype, dropout=dropout)
      total = term if total is None else total + term
    return total

  def lora_factors(self, ops: LayerOps) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Exact plain-LoRA factors by concatenation (PEFT's ``cat`` construction).

    ``A = [w_1 s_1 A_1, ..., w_K s_K A_K]`` along the rank axis, ``B`` the
    upstream B's concatenated to match, scaling 1.
    """
    weights = self.weights()
    a_parts, b_parts = [], []
    stack_ndim = weights.ndim - 1
    for k, upstream in enumerate(self.upstreams):
      a, b, scaling = upstream.lora_factors(ops)
      a_parts.append(a * _broadcast_stack(weights[..., k] * scaling, a.ndim))
      b_parts.append(b)
    a = jnp.concatenate(a_parts, axis=-1)
    b = jnp.concatenate(b_parts, axis=stack_ndim + ops.b_rank_axis)
    return a, b, jnp.ones(weights.shape[:-1], jnp.float32)


Adapter = LoraAdapter | WLoraAdapter


def delta_weight(adapter: Adapter, ops: LayerOps) -> jax.Array:
  """The adapter's update in the base kernel's layout, ``[*stack, *kernel]``."""
  a, b, scaling = adapter.lora_factors(ops)

  def one(a, b, s):
    return ops.factors_to_weight(a, b) * s

  return over_stack(one, scaling.ndim)(a, b, scaling)
