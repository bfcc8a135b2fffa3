"""PEFT's adapter scale and layer switches on a whole model: ``set_scale``, ``scale_layer``,
``unscale_layer``, and persistent ``disable_adapter_layers`` / ``enable_adapter_layers``.

Scales act on each LoRA adapter's ``scaling [*stack]`` (``lora_alpha / r``,
or ``/ sqrt(r)`` with rsLoRA); stacked layers an adapter leaves out keep 0.
Adapters without a scaling (WLoRA, VeRA) are left as they are, as PEFT skips
layers whose adapter has no scaling entry.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nn._inject import _holders, _require, active_adapters, lora_layers, peft_config


def _scaled(model: nnx.Module, names):
  """``(adapter, base scaling [*stack])`` of every LoRA adapter of ``names`` that has a scaling."""
  configs = peft_config(model)
  for _, layer in lora_layers(model):
    for name in names:
      adapter = layer.adapters.get(name) if name in layer.adapters else None
      scaling = getattr(adapter, "scaling", None)
      if not isinstance(scaling, nnx.Variable) or not hasattr(configs[name], "scaling_for"):
        continue
      live = np.asarray(adapter.live_ranks()) > 0
      base = np.where(live, [configs[name].scaling_for(m) for m in layer.module_names], 0.0)
      yield adapter, jnp.asarray(base.reshape(scaling.shape), jnp.float32)


def set_scale(model: nnx.Module, adapter_name: str, scale: float) -> None:
  """Adapter ``adapter_name``'s scaling becomes ``scale · lora_alpha / r`` in every layer (PEFT's
  ``LoraLayer.set_scale``: absolute, not relative to the current scale)."""
  _require(model, [adapter_name])
  for adapter, base in _scaled(model, [adapter_name]):
    adapter.scaling[...] = base * float(scale)


def scale_layer(model: nnx.Module, scale: float) -> None:
  """Multiply the scaling of every active adapter by ``scale`` (PEFT's ``scale_layer``)."""
  for adapter, _ in _scaled(model, active_adapters(model)):
    adapter.scaling[...] = adapter.scaling[...] * float(scale)


def unscale_layer(model: nnx.Module, scale: float | None = None) -> None:
  """Divide the active adapters' scaling by ``scale``; with None, reset it to ``lora_alpha / r``
  (PEFT's ``unscale_layer``)."""
  if scale is not None and float(scale) == 0.0:
    raise ValueError("unscale_layer(scale=0) would divide by zero; pass the scale you multiplied by, or None "
                     "to reset the scaling to lora_alpha / r.")
  for adapter, base in _scaled(model, active_adapters(model)):
    adapter.scaling[...] = base if scale is None else adapter.scaling[...] / float(scale)


def disable_adapter_layers(model: nnx.Module) -> None:
  """Until ``enable_adapter_layers``, the model computes its base output (PEFT's
  ``disable_adapter_layers``; ``disable_adapters`` is the scoped form). Merged adapters are unmerged."""
  for _, layer in lora_layers(model):
    layer.unmerge()
  for _, holder in _holders(model):
    holder.disabled = True


def enable_adapter_layers(model: nnx.Module) -> None:
  """Undo ``disable_adapter_layers``: the active adapters run again."""
  for _, holder in _holders(model):
    holder.disabled = False
