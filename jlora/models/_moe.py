"""Mixture-of-experts math: top-k router and dropless grouped experts by ``jax.lax.ragged_dot``.

Mirrors transformers' sparse MoE blocks (``Qwen3MoeSparseMoeBlock`` and
friends): a softmax router picks ``k`` experts per token, each expert is a
gated MLP, and a token's output is the routing-weighted sum of its experts.

Layout (jlora's kernel convention, ``x @ W``; transformers stores the
transpose ``[E, out, in]``):

* ``router``: ``[H, E]``.
* ``gate_up``: ``[E, H, 2I]``, columns ``[gate | up]`` (transformers' ``chunk(2)``).
* ``down``: ``[E, I, H]``.

Expert compute is dropless: the ``T·k`` (token, expert) pairs are sorted by
expert and every projection is one ``jax.lax.ragged_dot`` over the sorted rows
with per-expert group sizes. No capacity, no padding, no loop over experts,
no dense all-experts compute.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  """Static routing settings of one sparse block.

  Attributes:
    num_experts: ``E``.
    top_k: experts per token (``num_experts_per_tok``).
    norm_topk_prob: renormalise the top-k probabilities to sum to 1 (Qwen's
      ``norm_topk_prob``; Mixtral always does).
    weights_in_input_dtype: cast the routing weights to the router logits'
      dtype before they scale the expert outputs (Qwen does; Mixtral keeps them
      float32). Only matters below float32.
  """

  num_experts: int
  top_k: int
  norm_topk_prob: bool = True
  weights_in_input_dtype: bool = True

  def __post_init__(self):
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"num_experts_per_tok={self.top_k} must be between 1 and num_experts={self.num_experts}.")


class Routing(NamedTuple):
  """What the router decides for ``T`` tokens.

  Attributes:
    logits: ``[T, E]`` router logits in the input dtype (transformers'
      ``router_logits``, the aux loss's input).
    weights: ``[T, k]`` routing weights, largest first.
    experts: ``[T, k]`` int32 expert ids, matching ``weights``.
  """

  logits: jax.Array
  weights: jax.Array
  experts: jax.Array


class Groups(NamedTuple):
  """The ``N = T·k`` (token, expert) pairs sorted by expert.

  Attributes:
    order: ``[N]`` sorted position -> flat pair index ``t·k + j`` (stable sort).
    inverse: ``[N]`` flat pair index -> sorted position.
    sizes: ``[E]`` int32 rows per expert (``ragged_dot``'s ``group_sizes``).
  """

  order: jax.Array
  inverse: jax.Array
  sizes: jax.Array


def route(x: jax.Array, router: jax.Array, spec: MoeSpec) -> Routing:
  """Softmax-then-top-k routing of ``x [T, H]`` by the router kernel ``router [H, E]`` (``gate.weight`` transposed)."""
  return top_k_routing(x @ router.astype(x.dtype), spec)


def top_k_routing(logits: jax.Array, spec: MoeSpec) -> Routing:
  """The routing of router ``logits [T, E]``, as transformers' ``*TopKRouter``.

  Softmax runs in float32 over the logits; the top-k are taken from the
  probabilities (so they are the top-k logits too) and optionally renormalised.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, spec.top_k)
  if spec.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  if spec.weights_in_input_dtype:
    weights = weights.astype(logits.dtype)
  return Routing(logits, weights, experts.astype(jnp.int32))


def group_by_expert(experts: jax.Array, num_experts: int) -> Groups:
  """Sort the flattened ``[T, k]`` expert choices by expert (stable), with group sizes.

  Args:
    experts: ``[T, k]`` int expert ids.
    num_experts: ``E``.
  """
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return Groups(order, inverse, sizes)


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
  """Rows of ``x`` (grouped by expert) times their expert's kernel: one ``ragged_dot``.

  ``y[n] = x[n] @ w[e]`` for the expert ``e`` whose group holds row ``n``.

  Args:
    x: ``[N, in]`` rows sorted by expert.
    w: ``[E, in, out]`` expert kernels.
    sizes: ``[E]`` rows per expert, summing to ``N``.

  Returns:
    ``[N, out]`` in ``x``'s dtype.
  """
  return jax.lax.ragged_dot(x, w.astype(x.dtype), sizes)


def experts_forward(x: jax.Array, routing: Routing, gate_up: jax.Array, down: jax.Array, *,
                    act: Callable[[jax.Array], jax.Array] = jax.nn.silu) -> jax.Array:
  """Dropless routed experts: ``Σ_j weight[t, j] · expert_{e[t, j]}(x[t])``.

  Gathers each token once per chosen expert in expert order, runs the fused
  gate/up projection, ``act(gate) · up`` and the down projection as grouped
  matmuls, scales by the routing weight, un-sorts and sums over the ``k``
  choices in float32 (transformers' ``grouped_mm`` order of operations).

  Args:
    x: ``[T, H]`` tokens.
    routing: the router's choice for ``x``.
    gate_up: ``[E, H, 2I]``.
    down: ``[E, I, H]``.
    act: the gate activation (``hidden_act``).

  Returns:
    ``[T, H]`` in ``x``'s dtype.
  """
  tokens, k = routing.experts.shape
  groups = group_by_expert(routing.experts, gate_up.shape[0])
  rows = x[groups.order // k]
  gate, up = jnp.split(grouped_matmul(rows, gate_up, groups.sizes), 2, axis=-1)
  out = grouped_matmul(act(gate) * up, down, groups.sizes)
  out = out * routing.weights.reshape(-1)[groups.order][:, None]
  out = out[groups.inverse].reshape(tokens, k, -1)
  return jnp.sum(out, axis=1, dtype=jnp.float32).astype(x.dtype)


def sparse_block(x: jax.Array, router: jax.Array, gate_up: jax.Array, down: jax.Array, spec: MoeSpec, *,
                 act: Callable[[jax.Array], jax.Array] = jax.nn.silu) -> tuple[jax.Array, jax.Array]:
  """A sparse MoE block on ``x [..., H]``: ``(output [..., H], router logits [T, E])`` (``T`` = tokens in ``x``)."""
  flat = x.reshape(-1, x.shape[-1])
  routing = route(flat, router, spec)
  return experts_forward(flat, routing, gate_up, down, act=act).reshape(x.shape), routing.logits
