"""``modules_to_save``: fully trainable copies of whole modules (PEFT's ``ModulesToSaveWrapper``).

A module named in ``LoraConfig.modules_to_save`` (e.g. ``lm_head``,
``embed_tokens``) is wrapped in a ``ModulesToSaveLayer``; each adapter that
names it owns a copy of the original module whose parameters are
``LoraParam`` (so they are in the adapter pytree and trained with it). The
active adapter's copy replaces the module in the forward pass; with no
adapter of this layer active (or adapters disabled) the original runs.
"""

from __future__ import annotations

from flax import nnx

from jlora.nn._layer import LoraLayer
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


def frozen_copy(module: nnx.Module) -> nnx.Module:
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


class ModulesToSaveLayer(LoraLayer):
  """A module whose adapters are whole trainable copies of it (not registered for LoRA).

  Merging leaves the copies as they are (the active copy keeps replacing the
  module); ``merge_and_unload`` puts the active copy in the module's place,
  as PEFT does.
  """

  linear_like = False

  def __init__(self, base_layer: nnx.Module, module_names):
    if len(tuple(module_names)) != 1:
      raise ValueError(
          f"modules_to_save: {module_names[0]} is a stacked (scanned) layer; full copies of "
          "stacked layers are not supported. Name an unstacked module such as lm_head.")
    super().__init__(base_layer, module_names)

  @classmethod
  def stack_shape_of(cls, base):
    return ()

  def kernel(self):
    raise TypeError(f"{self.module_names[0]} is a modules_to_save copy and has no LoRA kernel.")

  def add(self, name: str, adapter: ModuleCopy) -> None:
    if name in self.adapters:
      raise ValueError(f"{self.module_names[0]} already has an adapter named {name!r}.")
    self.adapters[name] = adapter

  def active_copy(self) -> nnx.Module:
    """The module the forward pass runs: the last active adapter's copy, else the original."""
    active = [n for n in self.active_adapters if n in self.adapters]
    if self.disabled or not active:
      return self.base_layer
    return self.adapters[active[-1]].module

  def __call__(self, x, *args, **kwargs):
    if self.routing is not None:
      raise ValueError("per_sample_adapters cannot route modules_to_save copies; run one adapter "
                       "per batch instead.")
    return self.active_copy()(x, *args, **kwargs)

  def attend(self, query):
    """Tied output heads (``Embed.attend``) use the active copy's table."""
    return self.active_copy().attend(query)

  def merge(self, names) -> None:
    return None

  def unmerge(self, names=None) -> None:
    return None

  def unloaded(self, names) -> nnx.Module:
    """What ``merge_and_unload`` leaves here: the copy of the last of ``names`` this layer has."""
    present = [n for n in names if n in self.adapters]
    return frozen_copy(self.adapters[present[-1]].module) if present else self.base_layer
