"""Per-sample adapters: row ``i`` of a batch goes through its own adapter (``per_sample_adapters``).

``per_sample_adapters`` puts a routing buffer on each ``LoraLayer``:
``routing [batch, n]`` holds a one-hot row per sample over the layer's
``routing_names`` (all zeros for the base model). The delta here replaces the
sum over active adapters in ``LoraLayer.with_adapters``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.nn._adapters import LayerOps, pad_axis


def routed_delta(layer: LayerOps, x: jax.Array, dtype) -> jax.Array:
  """What ``layer``'s routed adapters add to its output for input ``x`` (one adapter per batch row).

  Every routed adapter's factors are folded to plain LoRA (``lora_factors``),
  padded to one rank, scaled into A and stacked with an all-zero adapter for
  base rows; each row then gathers its own ``A``, ``B`` and the delta is one
  batched ``x·A`` and one batched ``h·B`` over the rows (punica / S-LoRA
  style), whatever the number of adapters.
  """
  weights = layer.routing[...]
  if x.shape[:1] != weights.shape[:1]:
    raise ValueError(
        f"per_sample_adapters got {weights.shape[0]} adapter names but {layer.module_names[0]} "
        f"sees a batch of {x.shape[0] if x.ndim else 'none'}; pass one name per batch row."
    )
  present = [j for j, name in enumerate(layer.routing_names) if name in layer.adapters]
  if not present:
    return jnp.zeros((), dtype)
  adapters = [layer.adapters[layer.routing_names[j]] for j in present]
  if any(adapter.dropout_active() or not adapter.folds_to_lora for adapter in adapters):
    return _looped_delta(layer, x, weights, dtype)
  factors = [adapter.lora_factors(layer) for adapter in adapters]
  rank = max(a.shape[-1] for a, _, _ in factors)
  a_all = jnp.stack([pad_axis(a * s.astype(a.dtype), -1, rank) for a, _, s in factors]
                    + [jnp.zeros(factors[0][0].shape[:-1] + (rank,), factors[0][0].dtype)])
  b_all = jnp.stack([pad_axis(b, layer.b_rank_axis, rank) for _, b, _ in factors]
                    + [jnp.zeros_like(pad_axis(factors[0][1], layer.b_rank_axis, rank))])
  chosen = weights[:, jnp.asarray(present)]
  rows = jnp.where(chosen.max(axis=-1) > 0, jnp.argmax(chosen, axis=-1), len(present))
  one_row = lambda x, a, b: layer.project_out(layer.project_in(x, a), b)
  return jax.vmap(one_row)(x, a_all[rows].astype(dtype), b_all[rows].astype(dtype))


def _looped_delta(layer: LayerOps, x: jax.Array, weights: jax.Array, dtype) -> jax.Array:
  """Per-sample routing by evaluating every routed adapter on the whole batch (used with dropout
  and for kinds without plain-LoRA factors)."""
  total = 0
  for j, name in enumerate(layer.routing_names):
    if name not in layer.adapters:
      continue
    delta = layer.adapters[name].delta(layer, x, dtype)
    rows = weights[:, j].astype(dtype).reshape((-1,) + (1,) * (delta.ndim - 1))
    total = total + rows * delta
  return total
