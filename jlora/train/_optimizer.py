"""Optimizers that touch only the trainable part of the adapters.

Training differentiates the ``LoraParam`` pytree (``jlora.split_adapter``);
the base model is not in it and has no optimizer state. Within that pytree,
WLoRA upstream factors and adapters that are not active are masked with
``optax.masked``: they get no optimizer state and a zero update, so they stay
bit-identical (no weight decay creeps in either).
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from jlora.nn import UpstreamLoraParam, active_adapters, split_adapter


def trainable_mask(model: nnx.Module, params: nnx.State | None = None):
  """Bool pytree over ``params`` (default: the model's ``LoraParam`` state).

  True for params of active adapters that are not WLoRA upstreams.
  """
  if params is None:
    _, params, _ = split_adapter(model)
  active = set(active_adapters(model))

  def trainable(path, variable) -> bool:
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    names = {keys[i + 1] for i, k in enumerate(keys[:-1]) if k == "adapters"}
    return not isinstance(variable, UpstreamLoraParam) and bool(names & active)

  return jax.tree_util.tree_map_with_path(
      trainable, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def adapter_optimizer(model: nnx.Module, tx: optax.GradientTransformation,
                      params: nnx.State | None = None) -> optax.GradientTransformation:
  """``tx`` for the trainable adapter params; a zero update for the frozen ones."""
  mask = trainable_mask(model, params)
  frozen = jax.tree.map(lambda m: not m, mask)
  return optax.chain(optax.masked(tx, mask), optax.masked(optax.set_to_zero(), frozen))
