"""Activation rematerialisation for the scanned layers: what the backward pass keeps, what it recomputes.

A LoRA backward pass needs few activations (the frozen kernels take no
gradient), but plain autodiff still keeps every elementwise intermediate
(norms in float32, the MLP's activation, products) for each layer. The
policies trade that memory for cheap recomputation:

- ``"none"``: keep whatever autodiff keeps (most memory, no recomputation);
- ``"matmuls"`` (default): keep the projections' outputs (the models mark
  them with ``saved``), adapters' low-rank ``x @ A`` and fused attention;
  recompute the elementwise work between them (norms, rope, activations,
  adapter additions) in the backward pass. It saves most of the memory and
  costs only memory-bound elementwise passes;
- ``"full"``: keep only each layer's input and recompute the layer (least memory,
  about one extra forward pass).

Forward-only calls (inference, generation) are unaffected.
"""

from __future__ import annotations

from typing import Any, Callable

import math

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

REMAT_POLICIES = ("none", "matmuls", "full")


SAVED = "saved_for_backward"
LOW_RANK_MAX = 256


def saved(x: jax.Array) -> jax.Array:
  """Mark a projection's output (after any adapter delta) as kept by the ``"matmuls"`` policy."""
  return checkpoint_name(x, SAVED)


def _low_rank_or_attention(prim, *args, **params) -> bool:
  """Fused-attention outputs and narrow matmuls (an adapter's ``x @ A``: at most ``LOW_RANK_MAX`` wide)."""
  if prim is jax.lax.dot_general_p:
    (_, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    rhs = args[1]
    free = math.prod(n for d, n in enumerate(rhs.shape) if d not in rhs_contract and d not in rhs_batch)
    return not lhs_batch and free <= LOW_RANK_MAX
  return prim.name.startswith("dot_product_attention_fwd")


save_matmuls_and_attention = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(SAVED), _low_rank_or_attention)
"""The ``"matmuls"`` policy: projection outputs marked ``saved``, low-rank adapter matmuls and
fused attention are kept; norms, rope, activations, adapter additions and the
frozen matmuls whose outputs the backward pass never reads are not."""


def check_remat(remat: str) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is not a rematerialisation policy; use one of {', '.join(REMAT_POLICIES)}.")
  return remat


def rematerialized(fn: Callable[..., Any], remat: str) -> Callable[..., Any]:
  """``fn(module, *arrays)`` under the named policy; state the module changes is written back."""
  if check_remat(remat) == "none":
    return fn
  policy = save_matmuls_and_attention if remat == "matmuls" else jax.checkpoint_policies.nothing_saveable

  def call(module: nnx.Module, *args):
    graphdef, state = nnx.split(module)

    def pure(state, *args):
      module = nnx.merge(graphdef, state)
      return fn(module, *args), nnx.state(module)

    out, state = jax.checkpoint(pure, policy=policy, prevent_cse=False)(state, *args)
    nnx.update(module, state)
    return out

  return call
