"""Hot-swap: new weights into an existing adapter slot, with the model's structure unchanged.

Only array values change (factors, scalings, rank masks, DoRA magnitudes;
every shape and dtype stays), so a jitted function of the model's state
does not recompile, as with PEFT's ``hotswap_adapter`` on a compiled model.
An adapter of smaller rank is zero-padded into the slot (and the slot's rank
mask, where it has one, marks the live rank), which leaves its update
exact; a larger rank than the slot cannot fit and is refused.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from jlora.nn._kinds import kind_of
from jlora.nn._inject import _require, lora_layers

SWAPPABLE_ROLES = {"A", "B", "magnitude"}
"""Parameter roles a hot-swap can write (with the adapter's ``scaling`` and ``rank_mask`` buffers)."""
Factors = Mapping[str, tuple]
"""module name -> ``(A [.., r], B [r, ..], scaling)`` or ``(A, B, scaling, magnitude [out])``."""


def hotswap_factors(model, adapter_name: str, factors: Factors) -> None:
  """Overwrite adapter ``adapter_name``'s weights with ``factors`` (jlora layouts, per module).

  Modules of the adapter that ``factors`` leaves out get a zero update (as in
  PEFT). Everything is checked before anything is written.

  Raises:
    ValueError: the adapter is merged, is not a LoRA/DoRA adapter, a module is
      not adapted by it, a rank exceeds the slot's, or a shape does not fit.
  """
  _require(model, [adapter_name])
  factors = dict(factors)
  writes = []
  for _, layer in lora_layers(model):
    if adapter_name not in layer.adapters:
      continue
    adapter = layer.adapters[adapter_name]
    if adapter_name in layer.merged_adapters:
      raise ValueError(f"Cannot hot-swap adapter {adapter_name!r}: it is merged into the base weights; "
                       "unmerge_adapter() first (as PEFT requires).")
    roles = {role: attr for attr, role in kind_of(adapter).roles.items()}
    if not {"A", "B"} <= set(roles) <= SWAPPABLE_ROLES:
      raise ValueError(f"Hot-swap replaces LoRA / DoRA adapters; {adapter_name!r} at "
                       f"{layer.module_names[0]} is a {kind_of(adapter).name} adapter with other parameters.")
    writes.append(_plan(layer, adapter, roles, factors))
  if factors:
    raise ValueError(
        f"The new adapter adapts modules that adapter {adapter_name!r} does not, e.g. "
        f"{', '.join(sorted(factors)[:4])}; hot-swapping cannot add layers (that would change the "
        "model's structure). Load it as a new adapter instead (jlora.load_peft).")
  for plan in writes:
    for variable, value in plan:
      variable[...] = jnp.asarray(value, variable[...].dtype)


def _plan(layer, adapter, roles: dict[str, str], factors: dict) -> list:
  """``(variable, new value)`` pairs for one layer; consumes its modules from ``factors``.

  ``roles`` maps each role of the adapter's kind to its attribute (``A``, ``B``, maybe ``magnitude``).
  """
  stack = layer.stack_shape
  size = max(1, int(np.prod(stack)))
  slot = adapter.rank
  var_a, var_b = getattr(adapter, roles["A"]), getattr(adapter, roles["B"])
  a = np.zeros((size,) + var_a.shape[len(stack):], np.float32)
  b = np.zeros((size,) + var_b.shape[len(stack):], np.float32)
  scaling = np.zeros(size, np.float32)
  mask = np.zeros((size, slot), np.float32)
  dora = "magnitude" in roles
  var_m = getattr(adapter, roles["magnitude"]) if dora else None
  magnitude = np.array(var_m[...], np.float32).reshape(size, -1) if dora else None
  b_axis = 1 + layer.b_rank_axis
  for i, module in enumerate(layer.module_names):
    if module not in factors:
      continue
    entry = factors.pop(module)
    new_a, new_b, new_scaling = (np.asarray(x, np.float32) for x in entry[:3])
    rank = new_a.shape[-1]
    if rank > slot:
      raise ValueError(
          f"Cannot hot-swap a rank-{rank} adapter into {module}, whose slot has rank {slot}: the "
          f"slot cannot grow without recompiling. Create the slot with r >= {rank} (e.g. load the "
          "largest adapter first, or add it with a larger r / rank_pattern), then hot-swap.")
    want_a = a.shape[1:-1] + (rank,)
    want_b = tuple(rank if d == b_axis - 1 else n for d, n in enumerate(b.shape[1:]))
    if new_a.shape != want_a or new_b.shape != want_b:
      raise ValueError(f"Hot-swap into {module}: factors A{new_a.shape}, B{new_b.shape} do not fit "
                       f"this layer, which needs A{want_a}, B{want_b} at rank {rank}.")
    if dora != (len(entry) > 3):
      raise ValueError(f"Hot-swap into {module}: the slot is {'DoRA' if dora else 'LoRA'} and the new "
                       f"adapter is {'LoRA' if dora else 'DoRA'}; use_dora must match (as in PEFT).")
    a[i, ..., :rank] = new_a
    index = [slice(None)] * new_b.ndim
    index[b_axis - 1] = slice(0, rank)
    b[i][tuple(index)] = new_b
    scaling[i] = float(new_scaling)
    mask[i, :rank] = 1.0
    if dora:
      magnitude[i] = np.asarray(entry[3], np.float32).reshape(-1)
  plan = [(var_a, a.reshape(stack + a.shape[1:])), (var_b, b.reshape(stack + b.shape[1:])),
          (adapter.scaling, scaling.reshape(stack))]
  if adapter.rank_mask is not None:
    plan.append((adapter.rank_mask, mask.reshape(stack + (slot,))))
  if dora:
    plan.append((var_m, magnitude.reshape(stack + magnitude.shape[1:])))
  return plan
