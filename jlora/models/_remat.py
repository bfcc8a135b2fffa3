"""Activation rematerialisation for the scanned layers: what the backward pass keeps, what it recomputes.

A LoRA backward pass needs few activations (the frozen kernels take no
gradient), but plain autodiff still keeps every elementwise intermediate
(norms in float32, the MLP's activation, products) for each layer. The
policies trade that memory for cheap recomputation:

- ``"none"``: keep whatever autodiff keeps (most memory, no recomputation);
- ``"matmuls"`` (default): keep matmul and attention outputs, recompute the
  elementwise work between them (norms, rope, activations) in the backward
  pass; it saves most of the memory and costs only memory-bound elementwise
  passes;
- ``"full"``: keep only each layer's input and recompute the layer (least memory,
  about one extra forward pass).

Forward-only calls (inference, generation) are unaffected.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

REMAT_POLICIES = ("none", "matmuls", "full")


def save_matmuls_and_attention(prim, *_, **params) -> bool:
  """Save outputs of plain matmuls (no batch dims) and of fused attention; recompute the rest."""
  if prim is jax.lax.dot_general_p:
    (_, _), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    return not lhs_batch and not rhs_batch
  return prim.name.startswith("dot_product_attention_fwd")


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
