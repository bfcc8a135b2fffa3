"""LoRA over a ``QuantizedLinear``, registered through the public layer registry.

The adapter math is ``LoraLinear``'s (A ``[in, r]``, B ``[r, out]``), so
LoRA, MoSLoRA, WLoRA, several adapters, per-sample adapters and PEFT
checkpoints work unchanged; the base output comes from the quantized matmul.
Merging into a quantized kernel would re-round it, so it is refused here:
``jlora.merge_and_unload`` dequantizes first.
"""

from __future__ import annotations

from jlora.nn import LoraLinear, register_lora_layer
from jlora.quant._linear import QuantizedLinear


@register_lora_layer(QuantizedLinear)
class QuantizedLoraLinear(LoraLinear):
  """``QuantizedLinear`` (kernel ``[in, out]``, stored quantized): A ``[in, r]``, B ``[r, out]``."""

  @classmethod
  def base_kernel(cls, base):
    return base.qkernel

  def merge(self, names):
    pending = [n for n in names if n in self.adapters and n not in self.merged_adapters]
    if pending:
      raise ValueError(
          f"{self.module_names[0]} has a quantized ({self.base_layer.spec.format}) base kernel, so "
          f"adapters {pending} cannot be merged into it in place. Use jlora.merge_and_unload(model) "
          "(dequantizes, merges; requantize=True to quantize again), or jlora.dequantize(model) first.")
