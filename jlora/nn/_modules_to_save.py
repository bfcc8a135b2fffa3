"""``modules_to_save``: fully trainable copies of whole modules (PEFT's ``ModulesToSaveWrapper``).

A module named in ``LoraConfig.modules_to_save`` (e.g. ``lm_head``,
``embed_tokens``) is wrapped in a ``ModulesToSaveWrapper``; each adapter that
names it owns a copy of the original module whose parameters are
``LoraParam`` (so they are in the adapter pytree and trained with it). The
active adapter's copy replaces the module in the forward pass; with no
adapter of this layer active (or adapters disabled) the original runs.
"""

from __future__ import annotations

from flax import nnx

from jlora.nn._variables import LoraParam


def trainable_copy(module: nnx.Module) -> nnx.Module:
  """A deep copy of ``module`` with every ``nnx.Param`` turned into a ``LoraParam``."""
  copy = nnx.clone(module)
  for _, node in nnx.iter_graph(copy):
    if isinstance(node, nnx.Module):
      for attr, value in list(vars(node).items()):
        if isinstance(value, nnx.Param) and not isinstance(value, LoraParam):
          setattr(node, attr, LoraParam(value[...]))
  return copy


def frozen_module_copy(module: nnx.Module) -> nnx.Module:
  """The inverse of ``trainable_copy``: a copy whose ``LoraParam`` are plain ``nnx.Param``."""
  copy = nnx.clone(module)
  for _, node in nnx.iter_graph(copy):
    if isinstance(node, nnx.Module):
      for attr, value in list(vars(node).items()):
        if isinstance(value, LoraParam):
          setattr(node, attr, nnx.Param(value[...]))
  return copy


class ModuleCopy(nnx.Module):
  """One adapter's trainable copy of the wrapped module."""

  def __init__(self, module: nnx.Module):
    self.module = trainable_copy(module)


class ModulesToSaveWrapper(nnx.Module):
  """A module whose adapters are whole trainable copies of it (PEFT's ``ModulesToSaveWrapper``).

  Not a ``LoraLayer``: it has no kernel to merge into and no delta. The
  forward pass runs the last active adapter's copy (the original with none
  active, or with adapters disabled); merging leaves the copies as they are;
  ``merge_and_unload`` puts the merged adapter's copy in the module's place,
  as PEFT does.

  Attributes:
    base_layer: the original module (PEFT's ``original_module``), frozen.
    adapters: adapter name -> ``ModuleCopy``.
    module_names: the module's PEFT-style name (one: stacked layers are refused).
    active_adapters / disabled: as on ``LoraLayer``.
  """

  def __init__(self, base_layer: nnx.Module, module_names):
    module_names = tuple(module_names)
    if len(module_names) != 1:
      raise ValueError(
          f"modules_to_save: {module_names[0]} is a stacked (scanned) layer; full copies of "
          "stacked layers are not supported. Name an unstacked module such as lm_head.")
    self.base_layer = base_layer
    self.adapters = nnx.Dict()
    self.module_names = module_names
    self.active_adapters: tuple[str, ...] = ()
    self.disabled = False

  def add(self, name: str, adapter: ModuleCopy) -> None:
    if name in self.adapters:
      raise ValueError(f"{self.module_names[0]} already has an adapter named {name!r}.")
    self.adapters[name] = adapter

  def remove(self, name: str) -> None:
    del self.adapters[name]
    self.active_adapters = tuple(n for n in self.active_adapters if n != name)

  def active_copy(self) -> nnx.Module:
    """The module the forward pass runs: the last active adapter's copy, else the original."""
    active = [n for n in self.active_adapters if n in self.adapters]
    if self.disabled or not active:
      return self.base_layer
    return self.adapters[active[-1]].module

  def __call__(self, x, *args, **kwargs):
    return self.active_copy()(x, *args, **kwargs)

  def attend(self, query):
    """Tied output heads (``Embed.attend``) use the active copy's table."""
    return self.active_copy().attend(query)

  def unloaded(self, names) -> nnx.Module:
    """What ``merge_and_unload`` leaves here: the copy of the last of ``names`` this module has."""
    present = [n for n in names if n in self.adapters]
    return frozen_module_copy(self.adapters[present[-1]].module) if present else self.base_layer


ModulesToSaveLayer = ModulesToSaveWrapper
"""Deprecated name of ``ModulesToSaveWrapper``."""
