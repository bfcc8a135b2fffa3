"""The adapter as a pytree: split it out, save it, put it back."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jlora.nn._variables import LoraBuffer, LoraParam, LoraRngKey

ADAPTER_STATE = nnx.Any(LoraParam, LoraBuffer, LoraRngKey)
"""Filter for everything adapters own: trainable params, buffers, dropout keys."""


def split_adapter(model: nnx.Module):
  """``(graphdef, adapter_params, frozen_state)``: what to differentiate, and the rest.

  ``adapter_params`` holds every ``LoraParam`` (not WLoRA's frozen upstream
  factors, which are buffers); ``frozen_state`` holds the base
  params and all other state. ``nnx.merge(graphdef, adapter_params,
  frozen_state)`` rebuilds the model, also inside ``jax.jit``; inside
  ``jax.grad`` pass ``copy=True`` (NNX transforms such as ``nnx.scan`` refuse
  variables created outside the trace they run in). State the forward pass
  writes (LoRA dropout counters) stays in the rebuilt model: return
  ``nnx.state(model, LoraRngKey)`` from the step to keep it.
  """
  return nnx.split(model, LoraParam, ...)


def adapter_state(model: nnx.Module) -> nnx.State:
  """All adapter-owned state (params, scalings, masks, dropout keys)."""
  return nnx.state(model, ADAPTER_STATE)


def load_adapter_state(model: nnx.Module, state: nnx.State) -> None:
  """Write a saved ``adapter_state`` back into a model with the same adapters.

  Raises a ValueError naming the first path or shape that does not fit.
  """
  current = dict(nnx.to_flat_state(adapter_state(model)))
  incoming = dict(nnx.to_flat_state(state))
  missing = sorted(set(current) - set(incoming))
  unexpected = sorted(set(incoming) - set(current))
  if missing or unexpected:
    raise ValueError(
        f"Adapter state does not fit the model: missing {_fmt(missing)}, unexpected "
        f"{_fmt(unexpected)}. Inject the same adapters (names, targets) before loading."
    )
  values = []
  for path, value in incoming.items():
    have = current[path]
    if tuple(have.shape) != tuple(value.shape):
      raise ValueError(
          f"Adapter state {'.'.join(map(str, path))} has shape {tuple(value.shape)}, the model "
          f"needs {tuple(have.shape)}: a rank or layer-shape mismatch."
      )
    # Keep the model's dtypes (a bf16 or numpy checkpoint must not change them).
    array = value[...] if isinstance(value, nnx.Variable) else value
    values.append((path, jnp.asarray(array, have[...].dtype)))
  nnx.update(model, nnx.from_flat_state(values))


def _fmt(paths) -> str:
  shown = [".".join(map(str, p)) for p in paths[:5]]
  return "[" + ", ".join(shown) + (", …" if len(paths) > 5 else "") + "]"
