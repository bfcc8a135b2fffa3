"""Activation rematerialisation for the scanned layers: what the backward pass keeps, what it recomputes.

A LoRA backward pass needs few activations (the frozen kernels take no
gradient), but plain autodiff still keeps every elementwise intermediate
(norms in float32, the MLP's activation, products) for each layer. The
policies trade that memory for cheap recomputation:

- ``"none"``: keep whatever autodiff keeps (most memory, no recomputation);
- ``"matmuls"`` (default): keep the projections' outputs (the models mark
  them with ``saved``), adapters' low-rank ``x @ A`` and fused attention
  (cuDNN's, and tokamax's with its softmax statistics);
  recompute the elementwise work between them (norms, rope, activations,
  adapter additions) in the backward pass. It saves most of the memory and
  costs only memory-bound elementwise passes;
- ``"full"``: keep only each layer's input and recompute the layer (least memory,
  about one extra forward pass).

Forward-only calls (inference, generation) are unaffected.

On a device mesh the trainer installs a ``LayerPlacement`` (``placed``): the
scan body then pins the carried activations to their batch sharding and
gathers each layer's weights inside the body, one layer at a time, in the
forward pass and again in the backward pass. Gathered weights are named
``GATHERED`` and no policy keeps them, so they are never saved residuals.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Protocol

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

REMAT_POLICIES = ("none", "matmuls", "full")


SAVED = "saved_for_backward"
GATHERED = "gathered_layer_weights"
LOW_RANK_MAX = 256
_FUSED_RESIDUALS: list[Callable[[dict], bool]] = []


def keep_fused_residuals(predicate: Callable[[dict], bool]) -> None:
  """Make the ``"matmuls"`` policy keep a fused kernel's outputs and residuals.

  ``predicate(params)`` gets the parameters of each ``remat_opt`` equation (a
  custom_vjp with remat optimisation, as kernel libraries write their
  attention) and says whether it is that kernel's. Kernel modules register
  themselves, so the policy depends on no optional kernel library.
  """
  _FUSED_RESIDUALS.append(predicate)


def saved(x: jax.Array) -> jax.Array:
  """Mark a projection's output (after any adapter delta) as kept by the ``"matmuls"`` policy."""
  return checkpoint_name(x, SAVED)


def _low_rank_or_attention(prim, *args, **params) -> bool:
  """Fused-attention outputs and narrow matmuls (an adapter's ``x @ A``: at most ``LOW_RANK_MAX`` wide).

  A fused kernel registered with ``keep_fused_residuals`` (tokamax's
  attention) is one ``remat_opt`` equation whose outputs are the attention
  output and the residuals its backward kernel reads. Keeping it saves
  recomputing the forward kernel in the backward pass.
  """
  if prim.name == "remat_opt":
    return any(kept(params) for kept in _FUSED_RESIDUALS)
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


class LayerPlacement(Protocol):
  """Where one scanned layer's arrays live on a mesh (installed by the trainer with ``placed``)."""

  def activations(self, x: jax.Array) -> jax.Array:
    """``x [B, ...]`` constrained to the batch sharding."""

  def layer_weights(self, state: nnx.State) -> nnx.State:
    """One layer's state (no layer axis) constrained to its gathered (compute) sharding."""


_PLACEMENT: contextvars.ContextVar[LayerPlacement | None] = contextvars.ContextVar("placement", default=None)


@contextlib.contextmanager
def placed(placement: LayerPlacement | None) -> Iterator[None]:
  """Trace the model under ``placement`` (``None``: single device, nothing changes)."""
  token = _PLACEMENT.set(placement)
  try:
    yield
  finally:
    _PLACEMENT.reset(token)


def placement() -> LayerPlacement | None:
  """The ``LayerPlacement`` being traced under, if any."""
  return _PLACEMENT.get()


def _not_gathered(prim, *args, **params) -> bool:
  """The ``"none"`` policy under a placement: keep everything but gathered weights and the gather itself."""
  return prim.name not in ("shard_map", "all_gather") and params.get("name") != GATHERED


def check_remat(remat: str) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is not a rematerialisation policy; use one of {', '.join(REMAT_POLICIES)}.")
  return remat


def _gathered(state: nnx.State, where: LayerPlacement | None) -> nnx.State:
  if where is None:
    return state
  return jax.tree.map(lambda x: checkpoint_name(x, GATHERED), where.layer_weights(state))


def rematerialized(fn: Callable[..., Any], remat: str) -> Callable[..., Any]:
  """``fn(module, *arrays)`` under the named policy; state the module changes is written back.

  Under a ``LayerPlacement`` the module's weights are gathered inside the
  checkpointed call (so the backward pass gathers them again instead of
  keeping them); ``"none"`` then keeps everything but the gathered weights.
  """
  where = placement()
  if check_remat(remat) == "none" and where is None:
    return fn
  if remat == "matmuls":
    policy = save_matmuls_and_attention
  elif remat == "full":
    policy = jax.checkpoint_policies.nothing_saveable
  else:
    policy = _not_gathered

  def call(module: nnx.Module, *args):
    graphdef, state = nnx.split(module)

    def pure(state, *args):
      module = nnx.merge(graphdef, _gathered(state, where))
      return fn(module, *args), nnx.state(module, nnx.Not(nnx.Param))  # params never change here

    out, state = jax.checkpoint(pure, policy=policy, prevent_cse=False)(state, *args)
    nnx.update(module, state)
    return out

  return call
