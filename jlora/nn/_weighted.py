"""``add_weighted_adapter``: a new adapter combined from existing ones (PEFT semantics).

- ``linear``: same rank; ``A = Σ sign(w s)·sqrt|w s|·A_k``, ``B = Σ sqrt|w s|·B_k``
  (not the weighted sum of the deltas: cross terms remain, exactly as in PEFT).
- ``cat``: ranks add; ``A = [w_k s_k A_k]``, ``B = [B_k]``: the delta is exactly
  ``Σ w_k ΔW_k``.
- ``svd``: ``Σ w_k ΔW_k`` truncated by SVD to ``svd_rank`` (default: largest rank).
- ``ties``: PEFT's TIES (magnitude pruning to ``density``, majority sign,
  disjoint mean) on A and on B, with the ``linear`` weights.
- ``magnitude_prune``: magnitude pruning to ``density``, then the weighted sum.
- ``dare_linear`` / ``dare_ties``: DARE: each element kept with probability
  ``density`` and rescaled by ``1/density``, then the weighted sum / TIES'
  sign election and disjoint mean. The masks are random: jlora draws them
  from ``seed`` (PEFT from torch's global generator), so the two agree given
  the same masks, not the same seed.
- ``<method>_svd`` (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): the method applied to the full updates
  ``ΔW_k = s_k·A_k·B_k`` with the plain weights, then truncated by SVD as ``svd``.
The new adapter has ``lora_alpha = r``, i.e. scaling 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nn._adapters import LoraAdapter, over_stack, pad_axis, scaled_concat
from jlora.nn._config import LoraConfig
from jlora.nn._kinds import kind_of
from jlora.nn._inject import _require, _set_configs, lora_layers, module_copies, peft_config
from jlora.nn._layer import LoraLayer

# Methods that combine A's and B's separately (one rank), and their update-level twins.
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = FACTOR_METHODS + ("cat",) + SVD_METHODS
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def add_weighted_adapter(
    model: nnx.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> None:
  """Add ``adapter_name`` combining ``adapters`` with ``weights`` (not activated).

  ``density`` (in [0, 1]) is the fraction of elements kept by the pruning
  methods; ``majority_sign_method`` (``"total"`` / ``"frequency"``) elects
  the sign for the TIES methods; ``seed`` draws the DARE masks.
  """
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
  if combination_type.removesuffix("_svd") in _NEEDS_DENSITY:
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 <= density <= 1.0:
      raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1], got {density!r}.")
    density = float(density)
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"seed must be an int, got {seed!r}.")
  if majority_sign_method not in ("total", "frequency"):
    raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
  if len(adapters) == 1:
    combination_type = "linear"

  shared = [w.module_names[0] for _, w in module_copies(model) if sum(a in w.adapters for a in adapters) > 1]
  if shared:
    raise ValueError(
        f"Cannot add weighted adapters if they target the same module with modules_to_save (as in "
        f"PEFT), but {shared} are; combine adapters whose modules_to_save do not overlap.")
  # modules_to_save copies are not combined (the new adapter has none)
  layers = [layer for _, layer in lora_layers(model) if any(a in layer.adapters for a in adapters)]
  unfolded = {a: kind_of(l.adapters[a]).name for l in layers for a in adapters
              if a in l.adapters and not l.adapters[a].folds_to_lora}
  if unfolded:
    raise ValueError(
        f"add_weighted_adapter combines LoRA factors, but {sorted(unfolded)} are "
        f"{'/'.join(sorted(set(unfolded.values())))} adapters, which do not fold to plain LoRA factors "
        "(DoRA's magnitude vectors have no weighted combination); merge them (merge_and_unload) instead.")
  ranks = {a: max(l.adapters[a].rank for l in layers if a in l.adapters) for a in adapters}
  if combination_type in FACTOR_METHODS and len(set(ranks.values())) != 1:
    raise ValueError(
        f"combination_type={combination_type!r} needs adapters of one rank, got {ranks}; "
        "use 'cat' or 'svd' for different ranks."
    )
  if combination_type in FACTOR_METHODS:
    new_rank = ranks[adapters[0]]
  elif combination_type == "cat":
    new_rank = sum(ranks.values())
  else:
    new_rank = svd_rank or max(ranks.values())
  if combination_type in SVD_METHODS:
    for layer in layers:
      if not layer.svd_compatible():
        raise ValueError(f"combination_type={combination_type!r} is not supported for "
                         f"{type(layer).__name__}.")
    _check_svd_rank(svd_rank, layers)
  mixing = dict(density=density, sign_method=majority_sign_method)

  names, built = set(), []  # every layer's factors first, so an error leaves the model as it was
  root_key = jax.random.key(seed)
  for index, layer in enumerate(layers):
    key = jax.random.fold_in(root_key, index)
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
    factors = [(layer.adapters[a].lora_factors(layer), w) for a, w in present]
    if combination_type == "cat":
      a, b = _cat(layer, factors, new_rank)
    elif combination_type in SVD_METHODS:
      method = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
      a, b = _svd(layer, factors, new_rank, method, key, **mixing)
    else:
      a, b = _task_arithmetic(layer, factors, combination_type, key, **mixing)
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


def _cat(layer: LoraLayer, factors, new_rank: int):
  b_axis = len(layer.stack_shape) + layer.b_rank_axis
  a, b = scaled_concat([(a, b, w * s) for (a, b, s), w in factors], b_axis)
  return pad_axis(a, a.ndim - 1, new_rank), pad_axis(b, b_axis, new_rank)


def _sqrt_weights(w: float, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PEFT's split of ``w·s`` over A (with the sign) and B."""
  ws = w * s
  root = jnp.sqrt(jnp.abs(ws))
  return jnp.where(ws >= 0, root, -root), root


def _task_arithmetic(layer, factors, method, key, **mixing):
  """PEFT's ``_generalized_task_arithmetic_weighted_adapter``: A's and B's mixed separately."""
  a_terms, b_terms = [], []
  for (a, b, s), w in factors:
    wa, wb = _sqrt_weights(w, s)
    a_terms.append((a, wa))
    b_terms.append((b, wb))
  stack_ndim = len(layer.stack_shape)
  key_a, key_b = jax.random.split(key)
  return (_mix(a_terms, method, key_a, stack_ndim, **mixing),
          _mix(b_terms, method, key_b, stack_ndim, **mixing))


def _magnitude_prune(x: jax.Array, density: float) -> jax.Array:
  if density >= 1:
    return x
  k = int(density * x.size)
  flat = jnp.abs(x).reshape(-1)
  keep = jnp.zeros_like(flat).at[jax.lax.top_k(flat, k)[1]].set(1.0) if k else jnp.zeros_like(flat)
  return x * keep.reshape(x.shape)


def _random_keep(key: jax.Array, x: jax.Array, density: float) -> jax.Array:
  """DARE's mask: each element kept with probability ``density``."""
  return jax.random.bernoulli(key, density, x.shape)


def _dare_prune(key: jax.Array, x: jax.Array, density: float) -> jax.Array:
  if density >= 1:
    return x
  return jnp.where(_random_keep(key, x, density), x / density, 0).astype(x.dtype)


def _merge_tensors(tensors: list, weights: jax.Array, keys: jax.Array, method: str, density, sign_method):
  """PEFT's ``merge_utils`` for one (unstacked) set of task tensors and their weights [K]."""
  if method in ("ties", "magnitude_prune"):
    tensors = [_magnitude_prune(t, density) for t in tensors]
  elif method in ("dare_linear", "dare_ties"):
    tensors = [_dare_prune(keys[k], t, density) for k, t in enumerate(tensors)]
  tensors = jnp.stack(tensors)
  weighted = tensors * weights.reshape((-1,) + (1,) * (tensors.ndim - 1))
  if method not in ("ties", "dare_ties"):
    return weighted.sum(0)
  sign = jnp.sign(tensors)
  magnitude = tensors.sum(0) if sign_method == "total" else sign.sum(0)
  mask = sign == jnp.where(magnitude >= 0, 1.0, -1.0)
  return (weighted * mask).sum(0) / jnp.maximum(mask.sum(0), 1.0)


def _stack_keys(key: jax.Array, count: int, stack: tuple) -> jax.Array:
  """``[*stack, count]`` keys: one per stacked layer and task tensor."""
  n = max(1, int(np.prod(stack)))
  return jax.random.split(key, n * count).reshape(stack + (count,))


def _mix(terms, method, key, stack_ndim, *, density, sign_method):
  """``_merge_tensors`` over ``(tensor [*stack, ...], weight [*stack])`` terms, per stacked layer."""
  tensors = [t for t, _ in terms]
  stack = tensors[0].shape[:stack_ndim]
  weights = jnp.stack([jnp.broadcast_to(w, stack) for _, w in terms], -1)
  keys = _stack_keys(key, len(terms), stack)
  one = lambda ts, ws, ks: _merge_tensors(ts, ws, ks, method, density, sign_method)
  return over_stack(one, stack_ndim)(tensors, weights, keys)


def _svd(layer: LoraLayer, factors, new_rank: int, method: str, key, *, density, sign_method):
  """Truncated SVD of the ``method``-mixed updates ``w_k ΔW_k`` back into factors of ``new_rank``."""
  stack_ndim = len(layer.stack_shape)

  def one(factor_list, weights, keys):
    a_dims = factor_list[0][0].shape[:-1]
    b_dims = factor_list[0][1].shape[1:]
    # A·B as an [A dims, B dims] matrix straight from the factors, whatever the kernel layout.
    as_matrix = lambda a, b: a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)
    deltas = [as_matrix(a, b) * s for a, b, s in factor_list]
    matrix = _merge_tensors(deltas, weights, keys, method, density, sign_method)
    u, sv, vh = jnp.linalg.svd(matrix, full_matrices=False)
    rank = min(new_rank, sv.shape[0])
    a = pad_axis(u[:, :rank] * sv[:rank], 1, new_rank)
    b = pad_axis(vh[:rank], 0, new_rank)
    return a.reshape(a_dims + (new_rank,)), b.reshape((new_rank,) + b_dims)

  stack = layer.stack_shape
  weights = jnp.broadcast_to(jnp.asarray([w for _, w in factors], jnp.float32), stack + (len(factors),))
  keys = _stack_keys(key, len(factors), stack)
  return over_stack(one, stack_ndim)([f for f, _ in factors], weights, keys)
