"""Lets flax 0.12.8 import on the benchmark GPU image (jax 0.11.2).

flax 0.12.8 (the newest on this project's package index) subclasses classes
from ``jax.experimental.hijax`` at import time for its opt-in "hijax
variables" (``flax_hijax_variable``, off by default). jax 0.11 renamed or
removed some of them, so the import fails although jlora never uses that
path. Import this module before flax: it adds inert stand-ins for the missing
names only, and only when they are missing.
"""

from __future__ import annotations


def patch_hijax() -> list[str]:
  """Add stand-ins for names flax expects; returns the names added."""
  from jax.experimental import hijax

  class _Stub:
    def __init__(self, *args, **kwargs):
      pass

    def __init_subclass__(cls, **kwargs):
      pass

  class _EffectSet:
    def add_type(self, _):
      pass

  added = []
  for name in ("HiPrimitive", "MutableHiType", "HiType", "AbstractValue", "AvalQDD",
               "AvalMutableQDD", "Zero"):
    if not hasattr(hijax, name):
      setattr(hijax, name, type(name, (_Stub,), {}))
      added.append(name)
  for name in ("instantiate_zeros", "is_undefined_primal"):
    if not hasattr(hijax, name):
      setattr(hijax, name, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("hijax unavailable")))
      added.append(name)
  if not hasattr(hijax, "control_flow_allowed_effects"):
    hijax.control_flow_allowed_effects = _EffectSet()
    added.append("control_flow_allowed_effects")
  return added


if __name__ == "__main__":
  print("patched:", patch_hijax())
