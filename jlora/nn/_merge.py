"""Merging adapters into base weights: in place on a model, or as pure functions.

The pure ``merge`` / ``unmerge`` take and return pytrees, so they run under
``jax.jit``; the in-place forms track what is merged so the forward pass never
adds a merged adapter twice.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from jlora.nn._kinds import kind_of
from jlora.nn._inject import (
    _require, _set_configs, active_adapters, lora_layers, module_copies, replace_module, untie_output_head)


def merge_adapter(model: nnx.Module, adapter_names: Sequence[str] | None = None, *,
                  safe_merge: bool = False) -> None:
  """Fold adapters (default: the active ones) into the base kernels, in place.

  The forward pass then skips merged adapters; ``unmerge_adapter`` restores
  the base weights to fp32 rounding. Merging into an embedding a tied output
  head reads first unties the head (``untie_output_head``), so the head keeps
  computing what it did and a saved merged model says ``tie_word_embeddings=False``.

  ``safe_merge=True`` (PEFT's) first checks that every merged kernel would be
  finite and raises, merging nothing, if an adapter would put NaN or inf in one.
  """
  names = tuple(adapter_names) if adapter_names is not None else active_adapters(model)
  _require(model, names)
  if safe_merge:
    for _, layer in lora_layers(model):
      layer.check_merge(names)
  for _, layer in list(lora_layers(model)):
    if any(n in layer.adapters for n in names):  # the tied head keeps the base table (untied first)
      untie_output_head(model, layer.module_names[0])
    layer.merge(names)


def unmerge_adapter(model: nnx.Module, adapter_names: Sequence[str] | None = None) -> None:
  """Subtract merged adapters (default: all of them) from the base kernels."""
  if adapter_names is not None:
    adapter_names = tuple(adapter_names)
    _require(model, adapter_names)
  for _, layer in lora_layers(model):
    layer.unmerge(adapter_names)


def merge_and_unload(model: nnx.Module, adapter_names: Sequence[str] | None = None, *,
                     safe_merge: bool = False) -> nnx.Module:
  """Merge adapters (default: the active ones) and remove every LoRA layer (``safe_merge``: as in
  ``merge_adapter``).

  Returns the same model object, now a plain model of base layers whose
  outputs equal the adapted model's unmerged outputs.
  """
  names = tuple(adapter_names) if adapter_names is not None else active_adapters(model)
  merge_adapter(model, names, safe_merge=safe_merge)
  for path, layer in list(lora_layers(model)):
    replace_module(model, path, layer.base_layer)
  for path, wrapper in list(module_copies(model)):
    # modules_to_save: the (last) merged adapter's copy takes the module's place, as in PEFT.
    replace_module(model, path, wrapper.unloaded(names))
  _set_configs(model, {})
  return model


def unload(model: nnx.Module, *, merge: bool = False, adapter_names: Sequence[str] | None = None,
           safe_merge: bool = False) -> nnx.Module:
  """Remove every LoRA layer: the base model comes back (returns the same model object).

  ``merge=True`` first merges ``adapter_names`` (default: the active adapters),
  so the plain model's outputs equal the adapted model's; that is
  ``jlora.merge_and_unload``, which also takes quantized models. ``safe_merge``: as in ``merge_adapter``.
  """
  if merge:
    return merge_and_unload(model, adapter_names, safe_merge=safe_merge)
  if adapter_names is not None:
    raise ValueError("unload(adapter_names=...) only applies with merge=True; unload() removes every adapter.")
  for path, layer in list(lora_layers(model)):
    layer.unmerge()
    replace_module(model, path, layer.base_layer)
  for path, wrapper in list(module_copies(model)):
    replace_module(model, path, wrapper.base_layer)
  _set_configs(model, {})
  return model


def _merged_state(fold, graphdef: nnx.GraphDef, base_state: nnx.State, *other_states: nnx.State):
  model = nnx.merge(graphdef, base_state, *other_states, copy=True)
  fold(model)
  full = dict(nnx.to_flat_state(nnx.state(model)))
  return nnx.from_flat_state([(path, full[path]) for path, _ in nnx.to_flat_state(base_state)])


def merge(graphdef: nnx.GraphDef, base_state: nnx.State, *adapter_states: nnx.State,
          adapter_names: Sequence[str] | None = None) -> nnx.State:
  """Pure merge: returns ``base_state`` with the adapters' deltas added.

  ``graphdef`` and the states come from one ``nnx.split`` of an adapted model,
  e.g. ``graphdef, adapter, base = nnx.split(model, jlora.LoraParam, ...)``;
  pass the base state first, then the others. Works under ``jax.jit``.
  Forward with the result and adapters disabled (or use ``merge_and_unload``)
  so deltas are not added twice.
  """
  def fold(model):
    names = tuple(adapter_names) if adapter_names is not None else active_adapters(model)
    for _, layer in module_copies(model):
      if any(n in layer.adapters for n in names):
        raise ValueError(
            f"The pure merge cannot fold the modules_to_save copy of {layer.module_names[0]} into "
            "the base state; use merge_and_unload, which puts the copy in the module's place.")
    merge_adapter(model, names)

  return _merged_state(fold, graphdef, base_state, *adapter_states)


def unmerge(graphdef: nnx.GraphDef, base_state: nnx.State, *adapter_states: nnx.State,
            adapter_names: Sequence[str] | None = None) -> nnx.State:
  """Pure inverse of ``merge``: subtracts the adapters' deltas from ``base_state``."""

  def subtract(model):
    names = tuple(adapter_names) if adapter_names is not None else active_adapters(model)
    for _, layer in lora_layers(model):
      stateful = [layer.adapters[n] for n in names
                  if n in layer.adapters and getattr(layer.adapters[n], "merge_needs_state", False)]
      if stateful:
        raise ValueError(
            f"The pure unmerge cannot take a {kind_of(stateful[0]).name} adapter out: undoing its merge "
            "needs what the merge kept (DoRA: the weight norm), which the pure merge does not return. "
            "Keep the unmerged base state, or use merge_adapter / unmerge_adapter in place.")
      layer.merged_adapters = tuple(n for n in names if n in layer.adapters)
      layer.unmerge()

  return _merged_state(subtract, graphdef, base_state, *adapter_states)
