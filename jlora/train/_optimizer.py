"""Optimizers that touch only the trainable part of the adapters.

Training differentiates the ``LoraParam`` pytree (``jlora.split_adapter``);
the base model is not in it and has no optimizer state. Within that pytree,
WLoRA upstream factors and adapters that are not active are masked with
``optax.masked``: they get no optimizer state and a zero update, so they stay
bit-identical (no weight decay creeps in either).

LoRA+ (Hayou et al., 2024; PEFT's ``create_loraplus_optimizer``) trains B with
a learning rate ``loraplus_lr_ratio`` times A's. optax optimizers apply the
learning rate as a final scale of the update, so scaling B's update by the
ratio is the same as giving B its own learning rate (weight decay included,
schedules included).
"""

from __future__ import annotations

import math

import jax
import optax
from flax import nnx

from jlora.nn import (
    LORAPLUS_B_ROLES, LoraEmbed, UpstreamLoraParam, active_adapters, is_frozen, lora_layers, module_copies,
    role_of, split_adapter)


def _keys(path) -> list:
  return [getattr(k, "key", getattr(k, "name", k)) for k in path]


def _map_variables(fn, params):
  return jax.tree_util.tree_map_with_path(
      lambda path, variable: fn(_keys(path), variable), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def trainable_mask(model: nnx.Module, params: nnx.State | None = None):
  """Bool pytree over ``params`` (default: the model's ``LoraParam`` state).

  True for params of active adapters whose role is not frozen (WLoRA upstreams, VeRA-like
  projections: ``jlora.nn.FROZEN_ROLES``).
  """
  if params is None:
    _, params, _ = split_adapter(model)
  active = set(active_adapters(model))

  def trainable(keys, variable) -> bool:
    names = {keys[i + 1] for i, k in enumerate(keys[:-1]) if k == "adapters"}
    frozen = isinstance(variable, UpstreamLoraParam) or is_frozen(keys)
    return not frozen and bool(names & active)

  return _map_variables(trainable, params)


def loraplus_groups(model: nnx.Module, params: nnx.State | None = None):
  """``"A"`` / ``"B"`` / ``"embedding"`` for every param, as PEFT's LoRA+ groups them.

  Every factor of an embedding adapter is ``"embedding"``; elsewhere params
  whose kind gives them a role of ``jlora.nn.LORAPLUS_B_ROLES`` (B, DoRA's
  magnitudes, 1-d vectors) are ``"B"``, as are the biases of
  ``modules_to_save`` copies; everything else (A, MoSLoRA mixers, WLoRA
  logits, copied weights) ``"A"``.
  """
  if params is None:
    _, params, _ = split_adapter(model)
  layers = dict(lora_layers(model))
  copies = dict(module_copies(model))

  def group(keys, variable) -> str:
    where = tuple(keys[:keys.index("adapters")]) if "adapters" in keys else None
    if isinstance(layers.get(where), LoraEmbed):
      return "embedding"
    if where in copies:  # PEFT: a full copy's 1-d params (biases) go with B
      return "B" if variable.ndim == 1 else "A"
    return "B" if role_of(keys) in LORAPLUS_B_ROLES else "A"

  return _map_variables(group, params)


def adapter_optimizer(model: nnx.Module, tx: optax.GradientTransformation,
                      params: nnx.State | None = None, *, loraplus_lr_ratio: float | None = None,
                      learning_rate: float | None = None,
                      loraplus_lr_embedding: float = 1e-6) -> optax.GradientTransformation:
  """``tx`` for the trainable adapter params; a zero update for the frozen ones.

  Args:
    model: the adapted model (its active adapters are trained).
    tx: the optimizer, built with A's learning rate (e.g. ``optax.adamw(lr)``).
    params: the ``LoraParam`` state the optimizer sees (default: the model's).
    loraplus_lr_ratio: LoRA+: B's learning rate over A's (PEFT suggests 16);
      None for plain training.
    learning_rate: with LoRA+ and embedding adapters, the (peak) learning rate
      ``tx`` was built with, so that embedding adapters train at
      ``loraplus_lr_embedding`` (PEFT's default 1e-6) on the same schedule.
    loraplus_lr_embedding: the learning rate of embedding adapters under LoRA+.
  """
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(f"tx must be an optax GradientTransformation such as optax.adamw(1e-4), got {tx!r}.")
  mask = trainable_mask(model, params)
  frozen = jax.tree.map(lambda m: not m, mask)
  parts = [optax.masked(tx, mask)]
  if loraplus_lr_ratio is not None:
    parts += _loraplus_scales(model, params, mask, loraplus_lr_ratio, learning_rate,
                              loraplus_lr_embedding)
  parts.append(optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*parts)


def _loraplus_scales(model, params, mask, ratio, learning_rate, lr_embedding) -> list:
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
    raise ValueError(f"loraplus_lr_ratio must be a positive number (PEFT suggests 16) and finite, got {ratio!r}.")
  groups = loraplus_groups(model, params)
  in_group = lambda name: jax.tree.map(lambda g, m: g == name and m, groups, mask)
  parts = [optax.masked(optax.scale(float(ratio)), in_group("B"))]
  has_embedding = any(jax.tree.leaves(in_group("embedding")))
  if has_embedding:
    if learning_rate is None or not learning_rate > 0:
      raise ValueError(
          "LoRA+ trains embedding adapters at loraplus_lr_embedding, which needs the learning rate "
          f"tx was built with: pass learning_rate=<that rate> (got {learning_rate!r}).")
    parts.append(optax.masked(optax.scale(lr_embedding / learning_rate), in_group("embedding")))
  return parts
