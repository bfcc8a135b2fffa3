"""``add_weighted_adapter``: a new adapter combined from existing ones (PEFT semantics).

- ``linear``: same rank; ``A = Σ sign(w s)·sqrt|w s|·A_k``, ``B = Σ sqrt|w s|·B_k``
  (not the weighted sum of the deltas: cross terms remain, exactly as in PEFT).
- ``cat``: ranks add; ``A = [w_k s_k A_k]``, ``B = [B_k]``: the delta is exactly
  ``Σ w_k ΔW_k``.
- ``svd``: ``Σ w_k ΔW_k`` truncated by SVD to ``svd_rank`` (default: largest rank).
- ``ties``: PEFT's TIES (magnitude pruning to ``density``, majority sign,
  disjoint mean) on A and on B, with the ``linear`` weights.
The new adapter has ``lora_alpha = r``, i.e. scaling 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.nn._adapters import LoraAdapter, over_stack
from jlora.nn._config import LoraConfig
from jlora.nn._inject import _require, _set_configs, lora_layers, peft_config
from jlora.nn._layer import LoraLayer

COMBINATIONS = ("linear", "cat", "svd", "ties")


def add_weighted_adapter(
    model: nnx.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
  """Add ``adapter_name`` combining ``adapters`` with ``weights`` (not activated)."""
  adapters, weights = list(adapters), [float(w) for w in weights]
  if not all(math.isfinite(w) for w in weights):
    raise ValueError(f"add_weighted_adapter weights must be finite numbers, got {weights}; NaN or inf "
                     "would make the new adapter's every output NaN.")
  configs = _require(model, adapters)
  if adapter_name in configs:
    raise ValueError(f"The model already has an adapter named {adapter_name!r}.")
  if len(adapters) != len(weights) or not adapters:
    raise ValueError(f"Need one weight per adapter: got {len(adapters)} adapters, {len(weights)} weights.")
  if combination_type not in COMBINATIONS:
    raise ValueError(f"Unknown combination_type {combination_type!r}; use one of {COMBINATIONS}.")
  if combination_type == "ties" and (density is None or not 0.0 <= density <= 1.0):
    raise ValueError(f"combination_type='ties' needs density in [0, 1], got {density!r}.")
  if len(adapters) == 1:
    combination_type = "linear"

  layers = [layer for _, layer in lora_layers(model) if any(a in layer.adapters for a in adapters)]
  ranks = {a: max(l.adapters[a].rank for l in layers if a in l.adapters) for a in adapters}
  if combination_type in ("linear", "ties") and len(set(ranks.values())) != 1:
    raise ValueError(
        f"combination_type={combination_type!r} needs adapters of one rank, got {ranks}; "
        "use 'cat' or 'svd' for different ranks."
    )
  new_rank = {"linear": ranks[adapters[0]], "ties": ranks[adapters[0]],
              "cat": sum(ranks.values()), "svd": svd_rank or max(ranks.values())}[combination_type]
  if combination_type == "svd":
    for layer in layers:
      if not layer.svd_compatible():
        raise ValueError(f"combination_type='svd' is not supported for {type(layer).__name__}.")
    _check_svd_rank(svd_rank, layers)

  names, built = set(), []  # every layer's factors first, so an error leaves the model as it was
  for layer in layers:
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
    factors = [(layer.adapters[a].lora_factors(layer), w) for a, w in present]
    if combination_type == "cat":
      a, b = _cat(layer, factors, new_rank)
    elif combination_type == "svd":
      a, b = _svd(layer, factors, new_rank)
    else:
      a, b = _task_arithmetic(layer, factors, combination_type, density, majority_sign_method)
    built.append((layer, LoraAdapter(a, b, jnp.ones(layer.stack_shape, jnp.float32))))
    names.update(n.rsplit(".", 1)[-1] for n in layer.module_names)
  for layer, adapter in built:
    layer.add(adapter_name, adapter)

  # Scaling is folded into the factors, so the new adapter has alpha = r (scaling 1).
  configs[adapter_name] = LoraConfig(r=new_rank, lora_alpha=new_rank, target_modules=tuple(sorted(names)))
  _set_configs(model, configs)


def _check_svd_rank(svd_rank, layers: list[LoraLayer]) -> None:
  """``svd_rank`` is None or an int in ``[1, max over layers of min(in, out)]``; a higher rank is only
  zero padding (a layer narrower than ``svd_rank`` keeps its exact full-rank update, padded)."""
  if svd_rank is None:
    return
  limit = max(min(math.prod(a[:-1]), math.prod(b[1:])) for a, b in (l.factor_shapes(1) for l in layers))
  if isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral) or not 1 <= svd_rank <= limit:
    raise ValueError(f"svd_rank must be an int in [1, {limit}] (min(in, out) of the widest adapted layer) "
                     f"or None for the largest input rank, got {svd_rank!r}.")


def _per_stack(values: jax.Array, ndim: int) -> jax.Array:
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _pad_rank(x: jax.Array, axis: int, rank: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, rank - x.shape[axis])
  return jnp.pad(x, pad)


def _cat(layer: LoraLayer, factors, new_rank: int):
  stack_ndim = len(layer.stack_shape)
  a = jnp.concatenate([a * _per_stack(w * s, a.ndim) for (a, _, s), w in factors], axis=-1)
  b_axis = stack_ndim + layer.b_rank_axis
  b = jnp.concatenate([b for (_, b, _), _ in factors], axis=b_axis)
  return _pad_rank(a, a.ndim - 1, new_rank), _pad_rank(b, b_axis, new_rank)


def _sqrt_weights(w: float, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PEFT's split of ``w·s`` over A (with the sign) and B."""
  ws = w * s
  root = jnp.sqrt(jnp.abs(ws))
  return jnp.where(ws >= 0, root, -root), root


def _task_arithmetic(layer, factors, combination_type, density, majority_sign_method):
  a_terms, b_terms = [], []
  for (a, b, s), w in factors:
    wa, wb = _sqrt_weights(w, s)
    a_terms.append((a, wa))
    b_terms.append((b, wb))
  if combination_type == "linear":
    combine = lambda terms: sum(x * _per_stack(k, x.ndim) for x, k in terms)
  else:
    combine = lambda terms: _ties(terms, density, majority_sign_method, len(layer.stack_shape))
  return combine(a_terms), combine(b_terms)


def _magnitude_prune(x: jax.Array, density: float) -> jax.Array:
  if density >= 1:
    return x
  k = int(density * x.size)
  flat = jnp.abs(x).reshape(-1)
  keep = jnp.zeros_like(flat).at[jax.lax.top_k(flat, k)[1]].set(1.0) if k else jnp.zeros_like(flat)
  return x * keep.reshape(x.shape)


def _ties(terms, density, majority_sign_method, stack_ndim):
  """PEFT's ``ties``: prune, elect a sign, weighted disjoint mean (per stacked layer)."""

  def one(tensors, weights):
    tensors = jnp.stack([_magnitude_prune(t, density) for t in tensors])
    sign = jnp.sign(tensors)
    magnitude = tensors.sum(0) if majority_sign_method == "total" else sign.sum(0)
    mask = sign == jnp.where(magnitude >= 0, 1.0, -1.0)
    weighted = tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1))
    return (weighted * mask).sum(0) / jnp.maximum(mask.sum(0), 1.0)

  if majority_sign_method not in ("total", "frequency"):
    raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
  tensors = [t for t, _ in terms]
  weights = jnp.stack([jnp.broadcast_to(w, tensors[0].shape[:stack_ndim]) for _, w in terms], -1)
  return over_stack(lambda ts, ws: one(ts, ws), stack_ndim)(tensors, weights)


def _svd(layer: LoraLayer, factors, new_rank: int):
  """Truncated SVD of ``Σ w_k ΔW_k`` back into factors of rank ``new_rank``."""
  stack_ndim = len(layer.stack_shape)

  def one(factor_list, weights):
    a_dims = factor_list[0][0].shape[:-1]
    b_dims = factor_list[0][1].shape[1:]
    # A·B as an [A dims, B dims] matrix straight from the factors, whatever the kernel layout.
    as_matrix = lambda a, b: a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
    matrix = sum(w * as_matrix(a, b) * s for (a, b, s), w in zip(factor_list, weights))
    u, sv, vh = jnp.linalg.svd(matrix, full_matrices=False)
    rank = min(new_rank, sv.shape[0])
    a = _pad_rank(u[:, :rank] * sv[:rank], 1, new_rank)
    b = _pad_rank(vh[:rank], 0, new_rank)
    return a.reshape(a_dims + (new_rank,)), b.reshape((new_rank,) + b_dims)

  weights = [w for _, w in factors]
  return over_stack(lambda f: one(f, weights), stack_ndim)([f for f, _ in factors])
