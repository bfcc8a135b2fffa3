"""LoRA over a ``QuantizedLinear``, registered through the public layer registry.

The adapter math is ``LoraLinear``'s (A ``[in, r]``, B ``[r, out]``), so
LoRA, MoSLoRA, WLoRA, several adapters, per-sample adapters and PEFT
checkpoints work unchanged; the base output comes from the quantized matmul.
Sibling fp8 projections of one input (``jlora.nn.lora_projections``) share
one fp8 cast of it and one GEMM (``fp8_projections``); each layer's adapters
are then added to its own slice as usual.
Merging into a quantized kernel would re-round it, so it is refused here:
``jlora.merge_and_unload`` dequantizes first.
"""

from __future__ import annotations

from jlora.nn import LoraLayer, LoraLinear, register_lora_layer
from jlora.quant._linear import QuantizedLinear, fp8_projections


@register_lora_layer(QuantizedLinear)
class QuantizedLoraLinear(LoraLinear):
  """``QuantizedLinear`` (kernel ``[in, out]``, stored quantized): A ``[in, r]``, B ``[r, out]``."""

  @classmethod
  def base_kernel(cls, base):
    return base.qkernel

  @classmethod
  def shared_projections(cls, layers, x):
    if any(isinstance(l, LoraLayer) and not isinstance(l, QuantizedLoraLinear) for l in layers):
      return None
    ys = fp8_projections([getattr(l, "base_layer", l) for l in layers], x)
    if ys is None:
      return None
    return tuple(l.with_adapters(y, x) if isinstance(l, LoraLayer) else y for l, y in zip(layers, ys))

  def merge(self, names):
    pending = [n for n in names if n in self.adapters and n not in self.merged_adapters]
    if pending:
      raise ValueError(
          f"{self.module_names[0]} has a quantized ({self.base_layer.spec.format}) base kernel, so "
          f"adapters {pending} cannot be merged into it in place. Use jlora.merge_and_unload(model) "
          "(dequantizes, merges; requantize=True to quantize again), or jlora.dequantize(model) first.")
