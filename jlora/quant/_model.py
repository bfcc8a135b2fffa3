"""Model-level quantization: swap Linear layers for ``QuantizedLinear`` in place, and back.

Layers are found by the same PEFT-style names adapters use
(``model.layers.3.self_attn.q_proj``); a stacked (scanned) module is quantized
as a whole, every layer with its own scales. Existing LoRA layers keep their
adapters: only their base layer changes.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from jlora.nn import (
    Candidate, LoraLayer, ModulesToSaveWrapper, candidates, lora_layer_type, lora_layers, name_matches, output_head_name,
    replace_module, unload)
from jlora.quant import _formats
from jlora.quant._formats import QuantSpec
from jlora.quant._linear import QuantizedLinear


def _selected(targets, cand: Candidate, head: str) -> bool:
  if targets is None or targets == "all-linear":
    return not any(name_matches((head,), n) for n in cand.names)
  return any(name_matches(targets, n) for n in cand.names)


def plan(model: nnx.Module, format: str, *, block_size: int = 64, double_quant: bool | None = None,
         targets: str | Sequence[str] | None = None) -> list[tuple[Candidate, QuantSpec]]:
  """The Linear layers ``quantize`` would replace and their specs; validates everything first."""
  double_quant = _formats.check_format(format, block_size, double_quant)
  merged = [layer.module_names[0] for _, layer in lora_layers(model) if layer.merged_adapters]
  if merged:
    raise ValueError(
        f"The model has merged adapters (e.g. at {merged[0]}); quantizing would round them into the "
        "base weights. Call jlora.unmerge_adapter(model) first, or jlora.merge_and_unload(model) to "
        "keep them in the base, then quantize.")
  head = output_head_name(model)
  targets = tuple(targets) if isinstance(targets, (list, tuple)) else targets
  chosen = []
  for cand in candidates(model):
    if not isinstance(cand.base, nnx.Linear) or not _selected(targets, cand, head):
      continue
    spec = QuantSpec(format, cand.base.in_features, cand.base.out_features, block_size, double_quant)
    _formats.check_shape(spec, cand.names[0])
    chosen.append((cand, spec))
  if not chosen and any(isinstance(c.base, QuantizedLinear) for c in candidates(model)):
    raise ValueError("The model's Linear layers are already quantized; call jlora.dequantize(model) first "
                     "to quantize them in another format.")
  if not chosen:
    raise ValueError(f"targets={targets!r} selects no nnx.Linear layer of the model; pass module names "
                     "like ['q_proj', 'v_proj'], a regex, or leave targets=None for every Linear layer "
                     "but the output head.")
  return chosen


def _install(model: nnx.Module, cand: Candidate, base: nnx.Module) -> None:
  """Put ``base`` where ``cand`` was; a LoRA layer is rebuilt around it, adapters kept (a
  ``modules_to_save`` wrapper keeps its copies and runs ``base`` as its original)."""
  if isinstance(cand.module, ModulesToSaveWrapper):
    cand.module.base_layer = base
    return
  if not isinstance(cand.module, LoraLayer):
    replace_module(model, cand.path, base)
    return
  old = cand.module
  new = lora_layer_type(base)(base, old.module_names)
  new.adapters = old.adapters
  new.active_adapters, new.merged_adapters, new.disabled = old.active_adapters, (), old.disabled
  replace_module(model, cand.path, new)


def quantize(model: nnx.Module, format: str = "nf4", *, block_size: int = 64,
             double_quant: bool | None = None, targets: str | Sequence[str] | None = None) -> nnx.Module:
  """Replace the model's ``nnx.Linear`` layers by ``QuantizedLinear`` in place; returns the model.

  Args:
    model: any NNX model, with or without (unmerged) adapters.
    format: ``"nf4"`` (4-bit NormalFloat, block absmax scales), ``"int8"`` or
      ``"fp8"`` (e4m3), both with per-output-channel scales.
    block_size: NF4 rows per scale; must divide every selected layer's input dim.
    double_quant: NF4 only; store the block scales as int8 (default True for nf4).
    targets: module names (suffix match, as PEFT's ``target_modules``), a
      regex, or None / ``"all-linear"``: every Linear layer but the output head
      (which, like embeddings, stays in full precision, as in QLoRA).

  Raises:
    ValueError: unknown format, a block size that does not divide a layer,
      merged adapters, or targets that select nothing; the model is unchanged.
  """
  for cand, spec in plan(model, format, block_size=block_size, double_quant=double_quant, targets=targets):
    _install(model, cand, QuantizedLinear.from_linear(cand.base, spec))
  return model


def quantized_layers(model: nnx.Module) -> list[tuple[Candidate, QuantizedLinear]]:
  """``(candidate, layer)`` for every ``QuantizedLinear`` (bare or under a LoRA layer)."""
  return [(c, c.base) for c in candidates(model) if isinstance(c.base, QuantizedLinear)]


def dequantize(model: nnx.Module) -> nnx.Module:
  """Replace every ``QuantizedLinear`` by an ``nnx.Linear`` holding its dequantized kernel, in place.

  The kernel comes back in the layer's original ``param_dtype``; its values
  are the quantized ones (the rounding done by ``quantize`` stays).
  """
  for cand, layer in quantized_layers(model):
    _install(model, cand, layer.to_linear())
  return model


def merge_and_unload(model: nnx.Module, adapter_names: Sequence[str] | None = None, *,
                     requantize: bool = False, safe_merge: bool = False) -> nnx.Module:
  """Merge adapters (default: the active ones), remove every LoRA layer; returns the same model.

  On a plain model this is ``jlora.nn.unload(model, merge=True)``. Quantized layers
  are first dequantized to their original ``param_dtype`` (e.g. bfloat16), the
  adapters merged into those kernels, and the result is a plain model in that
  dtype. Its outputs match the adapted quantized model's up to the dtype's
  rounding of the merged kernel (bf16: 2**-8 relative per weight), plus, for
  fp8, the per-row activation rounding (up to 2**-4 relative) the fp8 matmul
  did. Against the original unquantized model they differ by the quantization
  error itself (see ``jlora.quant``: nf4 up to 0.152 x block absmax per weight,
  int8 absmax/254, fp8 2**-4 relative).

  ``requantize=True`` quantizes the merged kernels again with each layer's
  own format and options: a second rounding of the same size, so an adapter
  update smaller than half a quantization step can vanish from that weight.
  ``safe_merge=True`` refuses (merging nothing) an adapter that would make a kernel non-finite.
  """
  specs = {cand.path: layer.spec for cand, layer in quantized_layers(model)}
  dequantize(model)
  unload(model, merge=True, adapter_names=adapter_names, safe_merge=safe_merge)
  if requantize:
    for cand in candidates(model):
      if cand.path in specs and isinstance(cand.base, nnx.Linear):
        _install(model, cand, QuantizedLinear.from_linear(cand.base, specs[cand.path]))
  return model
