"""LoRA over a ``QuantizedLinear``, registered through the public layer registry.

The adapter math is ``LoraLinear``'s (A ``[in, r]``, B ``[r, out]``), so
LoRA, MoSLoRA, WLoRA, several adapters, per-sample adapters and PEFT
checkpoints work unchanged; the base output comes from the quantized matmul.
Sibling fp8 projections of one input (``jlora.nn.lora_projections``) share
one fp8 cast of it and one GEMM (``fp8_projections``), and with
``fused_lora`` (default) the adapters of the group run inside the fp8
matmul's custom backward, the low-rank way (``fp8_lora_matmuls``); otherwise
each layer's adapters are added to its own slice under plain autodiff.
Merging into a quantized kernel would re-round it, so it is refused here:
``jlora.merge_and_unload`` dequantizes first.
"""

from __future__ import annotations

import jax.numpy as jnp

from jlora.nn import LoraLayer, LoraLinear, register_lora_layer
from jlora.quant._fp8 import fp8_lora_matmuls
from jlora.quant._linear import QuantizedLinear, fp8_group, fp8_projections


@register_lora_layer(QuantizedLinear)
class QuantizedLoraLinear(LoraLinear):
  """``QuantizedLinear`` (kernel ``[in, out]``, stored quantized): A ``[in, r]``, B ``[r, out]``."""

  @classmethod
  def base_kernel(cls, base):
    return base.qkernel

  def dense_kernel(self):
    """The dequantized kernel (float32): DoRA's column norm is over it, as PEFT's on a quantized base."""
    return self.base_layer.dequantized_kernel(jnp.float32)

  @classmethod
  def shared_projections(cls, layers, x):
    if any(isinstance(l, LoraLayer) and not isinstance(l, QuantizedLoraLinear) for l in layers):
      return None
    ys = _fused(layers, x)
    if ys is not None:
      return ys
    ys = fp8_projections([getattr(l, "base_layer", l) for l in layers], x)
    if ys is None:
      return None
    return tuple(l.with_adapters(y, x) if isinstance(l, LoraLayer) else y for l, y in zip(layers, ys))

  def __call__(self, x, *args, **kwargs):
    ys = None if args or kwargs else _fused([self], x)
    return super().__call__(x, *args, **kwargs) if ys is None else ys[0]

  def merge(self, names):
    pending = [n for n in names if n in self.adapters and n not in self.merged_adapters]
    if pending:
      raise ValueError(
          f"{self.module_names[0]} has a quantized ({self.base_layer.spec.format}) base kernel, so "
          f"adapters {pending} cannot be merged into it in place. Use jlora.merge_and_unload(model) "
          "(dequantizes, merges; requantize=True to quantize again), or jlora.dequantize(model) first.")


def _fused(layers, x):
  """Outputs of fp8 layers (``QuantizedLoraLinear`` or bare ``QuantizedLinear``) on one ``x`` through
  ``fp8_lora_matmuls``, or None when one of them needs another path."""
  bases = [getattr(l, "base_layer", l) for l in layers]
  group = fp8_group(bases, x)
  if group is None or not all(b.fused_lora for b in bases):
    return None
  factors = [l.folded_factors() if isinstance(l, LoraLayer) else
             (jnp.zeros((b.in_features, 0), jnp.float32), jnp.zeros((0, b.out_features), jnp.float32))
             for l, b in zip(layers, bases)]
  if any(f is None for f in factors):
    return None
  dtype, backward, kernels = group
  ys = fp8_lora_matmuls(x.astype(dtype), kernels, tuple(a for a, _ in factors), tuple(b for _, b in factors),
                        dtype, backward)
  return tuple(b.add_bias(y) for b, y in zip(bases, ys))
