"""DoRA (Liu et al., 2024): a LoRA adapter plus a learned magnitude per output feature.

The adapted weight is ``m ⊙ (W + s·A·B) / ‖W + s·A·B‖``, the norm taken per
output feature over everything else of the kernel (Flax layouts keep the
output last: Linear ``[in, out]``, Embed ``[num, features]``, Conv
``[*window, in, out]``), i.e. PEFT's ``DoraLinearLayer`` /
``DoraEmbeddingLayer`` / ``_DoraConvNdLayer`` norm. As in PEFT (and the
paper, §4.3) the norm is a constant in the backward pass, and the forward
pass adds ``(m/‖·‖ - 1)·(x·W) + m/‖·‖ · s·x·A·B`` to the base output, where
``x·W`` is the base output without bias (with LoRA dropout active: the base
kernel applied to the dropped-out input, as PEFT does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.nn._adapters import LayerOps, LoraAdapter
from jlora.nn._variables import LoraBuffer, LoraParam


def column_norm(weight: jax.Array, stack_ndim: int = 0) -> jax.Array:
  """L2 norm of ``weight [*stack, *kernel]`` per output feature (last axis): ``[*stack, out]``."""
  axes = tuple(range(stack_ndim, weight.ndim - 1))
  return jnp.sqrt(jnp.sum(jnp.square(weight.astype(jnp.float32)), axis=axes))


def along_output(values: jax.Array, kernel_ndim: int, stack_ndim: int = 0) -> jax.Array:
  """``[*stack, out]`` reshaped to broadcast against a ``[*stack, *kernel]`` array."""
  stack = values.shape[:stack_ndim]
  return values.reshape(stack + (1,) * (kernel_ndim - 1) + values.shape[-1:])


class DoraAdapter(LoraAdapter):
  """A LoRA adapter with DoRA's magnitude vector.

  Attributes:
    lora_magnitude_vector: ``[*stack, out]`` trainable magnitudes; at init
      the column norms of ``W + s·A·B``, so the output starts unchanged.
    merge_norm: ``[*stack, out]``, the norm used by the last merge (unmerging
      needs it, as PEFT caches it).
  """

  folds_to_lora = False  # the magnitudes rescale the base weight too
  output_hook = True  # as PEFT, on the output so far (other adapters' deltas in it)
  merge_needs_state = True  # unmerging divides by the norm of the merge

  def __init__(self, lora_A, lora_B, scaling, magnitude: jax.Array, **kwargs):
    super().__init__(lora_A, lora_B, scaling, **kwargs)
    param_type = kwargs.get("param_type", LoraParam)
    self.lora_magnitude_vector = param_type(jnp.asarray(magnitude, jnp.float32))
    self.merge_norm = LoraBuffer(jnp.ones(magnitude.shape, jnp.float32))

  def output_scale(self, ops: LayerOps, kernel: jax.Array) -> jax.Array:
    """``m / ‖W + s·A·B‖`` for one (unstacked) layer, the norm a constant for autodiff: ``[out]``."""
    a, b, scaling = self.lora_factors(ops)
    delta = jax.lax.stop_gradient(ops.factors_to_weight(a, b) * scaling)
    norm = jax.lax.stop_gradient(column_norm(kernel.astype(jnp.float32) + delta))
    return self.lora_magnitude_vector[...] / norm

  def output_delta(self, layer, x: jax.Array, y: jax.Array, *args, **kwargs) -> jax.Array:
    """What DoRA adds to the base output ``y`` of ``layer`` for input ``x`` (one layer)."""
    dtype = y.dtype
    bias = getattr(layer.base_layer, "bias", None)
    dropped = self.dropout_key is not None and not self.deterministic
    xd = self.apply_dropout(x) if dropped else x
    lora = self.delta(layer, xd, dtype, dropout=False)
    # Without dropout the base output is already there; with it, PEFT recomputes x_dropped·W.
    base = layer.base_layer(xd, *args, **kwargs) if dropped else y
    if bias is not None:
      base = base - bias[...].astype(dtype)
    scale = self.output_scale(layer, layer.dense_kernel()).astype(dtype)
    return (scale - 1) * base + scale * lora

  dora_delta = output_delta

  def merge(self, layer: LayerOps, kernel: jax.Array) -> jax.Array:
    """``W ← m/‖W₀ + ΔW‖ ⊙ (W + ΔW)``, the norm over the kernel without any merged adapter
    (``W₀``), as PEFT; the norm is kept for unmerging."""
    delta = self.delta_weight(layer)
    self.merge_norm[...] = column_norm(layer.unmerged_kernel() + delta, len(layer.stack_shape))
    return merged_scale(self, layer) * (kernel + delta)

  def unmerge(self, layer: LayerOps, kernel: jax.Array) -> jax.Array:
    return kernel / merged_scale(self, layer) - self.delta_weight(layer)


def new_dora_adapter(layer: LayerOps, a: jax.Array, b: jax.Array, scaling: jax.Array, *,
                     rewrites_base: bool, **kwargs) -> DoraAdapter:
  """A ``DoraAdapter`` for ``layer`` whose magnitudes leave its output unchanged at init.

  The magnitudes are the column norms of ``W + s·A·B`` (``[*stack, out]``);
  with ``rewrites_base`` (PiSSA/OLoRA, which then move ``s·A·B`` out of the
  kernel, so ``W_res + s·A·B`` is today's kernel) of ``W`` alone. ``kwargs``
  go to ``LoraAdapter``.
  """
  stack = layer.stack_shape
  kernel = layer.dense_kernel()
  adapter = DoraAdapter(a, b, scaling, jnp.zeros(stack + kernel.shape[-1:]), **kwargs)
  delta = 0.0 if rewrites_base else adapter.delta_weight(layer)
  weight = jnp.asarray(kernel, jnp.float32) + delta
  adapter.lora_magnitude_vector[...] = column_norm(weight, len(stack))
  return adapter


def merged_scale(adapter: DoraAdapter, layer: LayerOps) -> jax.Array:
  """``m / ‖W₀ + ΔW‖`` of the last merge, shaped to broadcast against ``layer``'s ``[*stack, *kernel]``."""
  stack_ndim = len(layer.stack_shape)
  factor = adapter.lora_magnitude_vector[...] / adapter.merge_norm[...]
  return along_output(factor, len(layer.kernel().shape) - stack_ndim, stack_ndim)
