"""The registry from base layer types to their ``LoraLayer`` wrappers.

Built-in layers register through the same public call a user makes::

    @jlora.register_lora_layer(MyDense)
    class LoraMyDense(jlora.nn.LoraLayer):
      ...

Lookup walks the base type's MRO, so a subclass of a registered layer is
handled by its parent's entry unless it registers its own.
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

from jlora.nn._layer import LoraLayer

_REGISTRY: dict[type, type[LoraLayer]] = {}

L = TypeVar("L", bound=type[LoraLayer])


def register_lora_layer(base_type: type, lora_type: type[LoraLayer] | None = None, *, override: bool = False):
  """Register ``lora_type`` as the LoRA wrapper for modules of ``base_type``.

  Usable as ``register_lora_layer(Base, LoraBase)`` or as a class decorator
  ``@register_lora_layer(Base)``. Registering a type twice is an error unless
  ``override=True``.
  """

  def register(cls: L) -> L:
    if not (isinstance(cls, type) and issubclass(cls, LoraLayer)):
      raise TypeError(f"{cls!r} must be a subclass of jlora.nn.LoraLayer.")
    if not (isinstance(base_type, type) and issubclass(base_type, nnx.Module)):
      raise TypeError(f"{base_type!r} must be an nnx.Module subclass.")
    if base_type in _REGISTRY and not override and _REGISTRY[base_type] is not cls:
      raise ValueError(
          f"{base_type.__name__} already maps to {_REGISTRY[base_type].__name__}; pass "
          "override=True to replace it."
      )
    _REGISTRY[base_type] = cls
    return cls

  return register(lora_type) if lora_type is not None else register


def unregister_lora_layer(base_type: type) -> None:
  """Remove ``base_type``'s entry (no error if absent)."""
  _REGISTRY.pop(base_type, None)


def lora_layer_type(module: object) -> type[LoraLayer] | None:
  """The wrapper registered for ``module``'s type (most specific first), if any."""
  if isinstance(module, LoraLayer):
    return None
  for klass in type(module).__mro__:
    if klass in _REGISTRY:
      return _REGISTRY[klass]
  return None


def registered_types() -> dict[type, type[LoraLayer]]:
  """A copy of the registry: base type -> LoRA wrapper type."""
  return dict(_REGISTRY)


