"""Adapter modules: the contract every kind's adapter keeps, LoRA / MoSLoRA, and WLoRA.

An adapter owns only arrays; the layer-type specific math (how x meets A, how
A and B form a kernel-shaped delta) comes from the ``LoraLayer`` it lives in,
passed in as ``ops``. Arrays carry the base kernel's stack dims in front (a
scanned model slices them per layer), so shapes below read
``[*stack, ...]``; inside a scanned call ``stack`` is empty.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nn._variables import LoraBuffer, LoraParam, LoraRngKey


class LayerOps(Protocol):
  """The layer-type math an adapter needs (implemented by ``LoraLayer``)."""

  b_rank_axis: int
  module_names: tuple[str, ...]

  @property
  def stack_shape(self) -> tuple[int, ...]: ...
  def kernel(self) -> nnx.Variable: ...
  def unmerged_kernel(self) -> jax.Array: ...
  def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]: ...
  def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array: ...
  def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array: ...
  def factors_to_weight(self, a: jax.Array, b: jax.Array) -> jax.Array: ...


def over_stack(fn, stack_ndim: int):
  """``fn`` mapped over ``stack_ndim`` leading axes of every argument."""
  for _ in range(stack_ndim):
    fn = jax.vmap(fn)
  return fn


def broadcast_stack(values: jax.Array, target_ndim: int) -> jax.Array:
  """Reshape ``[*stack]`` values so they broadcast against a ``[*stack, ...]`` array."""
  return values.reshape(values.shape + (1,) * (target_ndim - values.ndim))


def pad_axis(array: jax.Array, axis: int, size: int) -> jax.Array:
  """``array`` zero-padded at the end of ``axis`` (negative axes count from the end) to ``size``."""
  axis = axis % array.ndim
  pad = [(0, 0)] * array.ndim
  pad[axis] = (0, size - array.shape[axis])
  return jnp.pad(array, pad)


def scaled_concat(factors, b_axis: int) -> tuple[jax.Array, jax.Array]:
  """``(A, B)`` of several plain LoRAs ``(A_k, B_k, weight_k [*stack])`` as one: ``A = [w_k A_k]``
  along the (last) rank axis, ``B = [B_k]`` along ``b_axis``; exactly ``Σ w_k A_k·B_k``."""
  a_parts = [a * broadcast_stack(jnp.asarray(w), a.ndim) for a, _, w in factors]
  b_parts = [b for _, b, _ in factors]
  a = a_parts[0] if len(a_parts) == 1 else jnp.concatenate(a_parts, axis=-1)
  b = b_parts[0] if len(b_parts) == 1 else jnp.concatenate(b_parts, axis=b_axis)
  return a, b


class AdapterModule(nnx.Module):
  """What a ``LoraLayer`` asks of any adapter it holds (every kind's adapter class subclasses this).

  ``ops`` / ``layer`` below is the ``LoraLayer`` the adapter lives in: the
  layer-type math (``project_in``, ``project_out``, ``factors_to_weight``),
  its kernel and stack shape. Only ``delta`` is required; the rest have
  defaults that suit an additive update with plain-LoRA factors.
  """

  folds_to_lora: ClassVar[bool] = True
  """Whether ``lora_factors`` gives the adapter's whole update (export, weighted combination,
  per-sample routing and the fused matmul build on that)."""
  output_hook: ClassVar[bool] = False
  """Whether the adapter acts on the layer's output so far (``output_delta``, as DoRA) instead of
  adding ``delta`` of the input."""
  merge_needs_state: ClassVar[bool] = False
  """Whether unmerging needs what the in-place merge kept (DoRA's norm), so the pure
  ``unmerge`` cannot undo it."""
  deterministic: bool = False

  @property
  def rank(self) -> int:
    raise TypeError(f"{type(self).__name__} must define rank")

  def delta(self, ops: LayerOps, x: jax.Array, dtype, *, dropout: bool = True) -> jax.Array:
    """The adapter's additive output for input ``x`` (unstacked call)."""
    raise TypeError(f"{type(self).__name__} must define delta()")

  def lora_factors(self, ops: LayerOps) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain-LoRA factors ``(A [*stack, .., R], B [*stack, ..], scaling [*stack])`` with this update."""
    raise TypeError(f"{type(self).__name__} has no plain-LoRA factors (folds_to_lora is False).")

  def export_factors(self, ops: LayerOps) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``lora_factors`` laid out so that stacked layer i's update lives in the first
    ``live_ranks()[i]`` ranks (what a per-module checkpoint keeps)."""
    return self.lora_factors(ops)

  def live_ranks(self) -> np.ndarray:
    """Rank of each stacked layer's update, flat ``[prod(stack)]``; 0 where the adapter leaves it out."""
    raise TypeError(f"{type(self).__name__} must define live_ranks()")

  def output_delta(self, layer: LayerOps, x: jax.Array, y: jax.Array, *args, **kwargs) -> jax.Array:
    """With ``output_hook``: what the adapter adds to the output ``y`` so far, for input ``x``."""
    raise TypeError(f"{type(self).__name__} has no output hook.")

  def delta_weight(self, ops: LayerOps) -> jax.Array:
    """The update in the base kernel's layout, ``[*stack, *kernel]``."""
    return factors_weight(ops, *self.lora_factors(ops))

  def merge(self, layer: LayerOps, kernel: jax.Array) -> jax.Array:
    """The kernel with this adapter folded in (``layer``'s other merged adapters already are)."""
    return kernel + self.delta_weight(layer)

  def unmerge(self, layer: LayerOps, kernel: jax.Array) -> jax.Array:
    """The inverse of ``merge``."""
    return kernel - self.delta_weight(layer)

  def init_dropout(self, rate: float, key: jax.Array | None, stack: tuple[int, ...]) -> None:
    """Input dropout at ``rate`` for an adapter over ``stack`` layers: one PRNG key and call counter
    per stacked layer (``LoraRngKey``); none at rate 0."""
    self.dropout_rate = float(rate)
    self.deterministic = False
    if rate > 0.0:
      keys = jax.random.split(key, stack) if stack else key
      self.dropout_key = LoraRngKey(jax.random.key_data(keys))
      self.dropout_count = LoraRngKey(jnp.zeros(stack, jnp.uint32))
    else:
      self.dropout_key = self.dropout_count = None

  def dropout_active(self) -> bool:
    """Whether the adapter applies dropout to its input in this call."""
    return getattr(self, "dropout_key", None) is not None and not self.deterministic

  def apply_dropout(self, x: jax.Array) -> jax.Array:
    """``x`` with ``init_dropout``'s dropout applied (unstacked call); ``x`` itself when inactive."""
    if not self.dropout_active():
      return x
    key = jax.random.fold_in(jax.random.wrap_key_data(self.dropout_key[...]), self.dropout_count[...])
    self.dropout_count[...] = self.dropout_count[...] + 1
    keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)

  _dropout = apply_dropout  # the name subclasses used before

  def check(self, layer: LayerOps, name: str) -> None:
    """Raise if the adapter does not fit ``layer`` (called when it is added)."""


def factors_weight(ops: LayerOps, a: jax.Array, b: jax.Array, scaling: jax.Array) -> jax.Array:
  """``s·A·B`` in the kernel's layout for stacked factors (``scaling [*stack]``)."""

  def one(a, b, s):
    return ops.factors_to_weight(a, b) * s

  return over_stack(one, scaling.ndim)(a, b, scaling)


class LoraAdapter(AdapterModule):
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
    self.init_dropout(dropout, dropout_key, self.scaling.shape)

  @property
  def rank(self) -> int:
    return self.lora_A.shape[-1]

  def live_ranks(self) -> np.ndarray:
    size = max(1, int(np.prod(self.scaling.shape)))
    if self.rank_mask is None:
      return np.full(size, self.rank, np.int64)
    return np.asarray(self.rank_mask[...]).reshape(size, -1).sum(-1).astype(np.int64)

  def check(self, layer: LayerOps, name: str) -> None:
    rank = self.lora_A.shape[-1]
    a_shape, b_shape = layer.factor_shapes(rank)
    want = (tuple(layer.stack_shape) + a_shape, tuple(layer.stack_shape) + b_shape)
    if (tuple(self.lora_A.shape), tuple(self.lora_B.shape)) != want:
      raise ValueError(
          f"Adapter {name!r} at {layer.module_names[0]}: factor shapes A{tuple(self.lora_A.shape)}, "
          f"B{tuple(self.lora_B.shape)} do not fit this layer, which needs A{want[0]}, B{want[1]} "
          f"for rank {rank}."
      )

  def delta(self, ops: LayerOps, x: jax.Array, dtype, *, dropout: bool = True) -> jax.Array:
    """The adapter's additive output for input ``x`` (unstacked call)."""
    if dropout:
      x = self.apply_dropout(x)
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

  def export_factors(self, ops: LayerOps) -> tuple[jax.Array, jax.Array, jax.Array]:
    """With a mixer and a rank mask, ``(A ⊙ mask)·(M·B)``: A keeps its live columns, the mixer goes
    into B's rows (folding it into A would spread every layer's update over the full rank)."""
    if self.lora_mixer is None or self.rank_mask is None:
      return self.lora_factors(ops)
    mask = self.rank_mask[...]
    mix_b = lambda m, b: jnp.moveaxis(jnp.tensordot(m, b, axes=([1], [ops.b_rank_axis])), 0, ops.b_rank_axis)
    a = self.lora_A[...] * mask.reshape(mask.shape[:-1] + (1,) * (self.lora_A.ndim - mask.ndim) + mask.shape[-1:])
    b = over_stack(mix_b, self.scaling.ndim)(self.lora_mixer[...], self.lora_B[...])
    return a, b, self.scaling[...]


class MoSLoraAdapter(LoraAdapter):
  """A LoRA adapter with MoSLoRA's ``[*stack, r, r]`` mixer (``lora_mixer``) between A and B."""


class WLoraAdapter(AdapterModule):
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

  def live_ranks(self) -> np.ndarray:
    """The full (concatenated) rank wherever an upstream adapts the layer."""
    size = max(1, int(np.prod(self.logits.shape[:-1])))
    scales = np.stack([np.asarray(u.scaling[...]).reshape(size) for u in self.upstreams], -1)
    return np.where((scales != 0).any(-1), self.rank, 0).astype(np.int64)

  def dropout_active(self) -> bool:
    return any(u.dropout_active() for u in self.upstreams)

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
    parts = []
    for k, upstream in enumerate(self.upstreams):
      a, b, scaling = upstream.lora_factors(ops)
      parts.append((a, b, weights[..., k] * scaling))
    a, b = scaled_concat(parts, weights.ndim - 1 + ops.b_rank_axis)
    return a, b, jnp.ones(weights.shape[:-1], jnp.float32)


Adapter = AdapterModule
"""Any kind's adapter (kept for code that named the old union)."""


def delta_weight(adapter: AdapterModule, ops: LayerOps) -> jax.Array:
  """The adapter's update in the base kernel's layout, ``[*stack, *kernel]``."""
  return adapter.delta_weight(ops)
