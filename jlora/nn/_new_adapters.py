"""Fresh adapters for one ``LoraLayer``: LoRA / MoSLoRA / DoRA factors at init.

The init math lives in ``_init``; this module shapes it for a layer: one
factor pair per stacked layer, per-layer ranks (``rank_pattern``,
``layers_to_transform``) as a rank mask over the stack's largest rank, and
the modes that read the base kernel (PiSSA, OLoRA, DoRA's magnitudes).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nn import _init
from jlora.nn._adapters import LayerOps
from jlora.nn._adapters import LoraAdapter, MoSLoraAdapter
from jlora.nn._dora import new_dora_adapter
from jlora.nn._variables import LoraParam


def new_lora_adapter(
    layer: LayerOps,
    key: jax.Array,
    ranks: Sequence[int],
    scalings: Sequence[float],
    *,
    init_lora_weights=True,
    mixer_init: str | None = None,
    use_dora: bool = False,
    dropout: float = 0.0,
    param_type: type[LoraParam] = LoraParam,
    dtype=jnp.float32,
) -> LoraAdapter:
  """A freshly initialised LoRA / MoSLoRA / DoRA adapter for ``layer``.

  Args:
    key: PRNG key for the factors, mixer and dropout.
    ranks: rank of each stacked layer (``len == prod(stack_shape)`` or 1);
      0 leaves that layer without an update.
    scalings: scaling of each stacked layer, same length.
    init_lora_weights: ``LoraConfig.init_lora_weights``.
    mixer_init: ``"orthogonal"`` / ``"kaiming"`` for MoSLoRA, None for LoRA.
    use_dora: a ``DoraAdapter`` (magnitudes from the current kernel).
  """
  stack = layer.stack_shape
  ranks = np.broadcast_to(np.asarray(ranks, np.int32), (max(1, math.prod(stack)),))
  max_rank = int(ranks.max())
  if max_rank < 1:
    raise ValueError(f"{layer.module_names[0]}: an adapter needs a positive rank.")
  a_shape, b_shape = layer.factor_shapes(max_rank)
  key_factors, key_mixer, key_dropout = jax.random.split(key, 3)
  scaling = np.broadcast_to(np.asarray(scalings, np.float32), ranks.shape).reshape(stack)
  if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian" and not layer.embedding_init:
    a, b = _matrix_init(layer, key_factors, init_lora_weights, max_rank, scaling, a_shape, b_shape, dtype)
  else:  # embeddings take their own init for every string mode, as in PEFT
    a, b = _init.lora_factors(
        key_factors, stack + a_shape, stack + b_shape, layer.fan_in(a_shape),
        init_lora_weights, dtype, embedding=layer.embedding_init)
  rank_mask = None
  if (ranks != max_rank).any():
    rank_mask = (np.arange(max_rank)[None, :] < ranks[:, None]).astype(np.float32)
    rank_mask = jnp.asarray(rank_mask.reshape(stack + (max_rank,)))
    a = a * rank_mask.reshape(stack + (1,) * (len(a_shape) - 1) + (max_rank,)).astype(dtype)
    rank_in_b = tuple(max_rank if i == layer.b_rank_axis else 1 for i in range(len(b_shape)))
    b = b * rank_mask.reshape(stack + rank_in_b).astype(dtype)
    if init_lora_weights == "gaussian" and not layer.embedding_init:
      # A with std 1/r for each stacked layer's own r, not the stack's largest one.
      per_layer = (max_rank / np.maximum(ranks, 1)).astype(np.float32)
      a = a * jnp.asarray(per_layer.reshape(stack + (1,) * len(a_shape))).astype(dtype)
  mixer = None
  if mixer_init == "orthogonal":
    mixer = _init.orthogonal(key_mixer, stack + (max_rank, max_rank), dtype)
  elif mixer_init == "kaiming":
    mixer = _init.kaiming_uniform(key_mixer, stack + (max_rank, max_rank), max_rank, dtype)
  elif mixer_init is not None:
    raise ValueError(f"Unknown mixer_init {mixer_init!r}; use 'orthogonal' or 'kaiming'.")
  kwargs = dict(rank_mask=rank_mask, mixer=mixer, dropout=dropout if layer.supports_dropout() else 0.0,
                dropout_key=key_dropout, param_type=param_type)
  if not use_dora:
    cls = LoraAdapter if mixer is None else MoSLoraAdapter
    return cls(a, b, jnp.asarray(scaling), **kwargs)
  require_dense_kernel(layer, "use_dora=True")
  if not layer.supports_dora:
    raise ValueError(
        f"use_dora=True: DoRA applies to Linear, Embed and Conv layers (as in PEFT), but "
        f"{layer.module_names[0]} is a {type(layer).__name__}; leave it out of target_modules.")
  return new_dora_adapter(layer, a, b, jnp.asarray(scaling),
                          rewrites_base=_init.rewrites_base(init_lora_weights), **kwargs)


def _matrix_init(layer: LayerOps, key, mode: str, rank: int, scaling: np.ndarray, a_shape, b_shape, dtype):
  """PiSSA / OLoRA / orthogonal factors ``(A, B)`` for every stacked layer, from the kernel.

  Each layer's kernel is seen as PEFT's weight ``W [out, in]``; stacked
  layers with scaling 0 (left out by ``layers_to_transform``) get zeros.
  """
  if not (layer.linear_like and layer.svd_compatible()):
    raise ValueError(
        f"init_lora_weights={mode!r} applies to linear layers only (PEFT computes it from a "
        f"[out, in] weight), but {layer.module_names[0]} is a {type(layer).__name__}; leave this "
        "module out of target_modules or use init_lora_weights=True.")
  if mode != "orthogonal":
    require_dense_kernel(layer, f"init_lora_weights={mode!r}")
  stack = layer.stack_shape
  fan_in, fan_out = math.prod(a_shape[:-1]), math.prod(b_shape[1:])
  if mode != "orthogonal" and rank > min(fan_in, fan_out):
    raise ValueError(
        f"init_lora_weights={mode!r} takes the top r components of {layer.module_names[0]}'s "
        f"[{fan_out}, {fan_in}] weight, so r must be <= {min(fan_in, fan_out)}, got {rank}; lower "
        "r (or its rank_pattern entry).")
  kernel = jnp.asarray(layer.kernel()[...], jnp.float32).reshape((-1, fan_in, fan_out))
  flat_scaling = jnp.asarray(scaling.reshape(-1))
  keys = jax.random.split(key, kernel.shape[0])

  def one(k, weight_t, s):
    live = s != 0
    s = jnp.where(live, s, 1.0)
    if mode == "olora":
      a, b = _init.olora(weight_t.T, rank)
    elif mode == "orthogonal":
      a, b = _init.orthogonal_factors(k, fan_in, fan_out, rank)
    else:
      niter = None if mode == "pissa" else int(mode.removeprefix("pissa_niter_"))
      a, b = _init.pissa(weight_t.T, rank, s, niter=niter, key=k)
    return jnp.where(live, a, 0.0), jnp.where(live, b, 0.0)

  a, b = jax.vmap(one)(keys, kernel, flat_scaling)
  return (a.reshape(stack + a_shape).astype(dtype), b.reshape(stack + b_shape).astype(dtype))


def require_dense_kernel(layer: LayerOps, option: str) -> None:
  """Raise unless ``layer``'s base kernel is a plain float parameter (PiSSA, OLoRA and DoRA read it)."""
  if not isinstance(layer.kernel(), nnx.Param):
    raise ValueError(
        f"{option} reads the base weight of {layer.module_names[0]}, which is stored quantized "
        f"({type(layer.kernel()).__name__}); PEFT asks for a float32/16/bf16 weight too. Call "
        "jlora.dequantize(model) before adding the adapter (and quantize the result again "
        "afterwards if you like).")
