"""fp8 matmuls over frozen e4m3 kernels, one input cast shared by every kernel that reads it.

For kernels ``i`` with e4m3 codes ``q_i [in, out_i]`` and per-channel scales
``s_i [out_i]`` (``W_i = q_i * s_i``), all applied to one input ``x [..., in]``
(attention's q/k/v, an MLP's gate/up):

* forward: ``x`` is cast once, per row, to e4m3 (``sx = amax|x| / 448``,
  ``xq = e4m3(x / sx)``), multiplied in one fp8 GEMM by the concatenated codes
  ``[q_1 | q_2 | ...]`` and each output slice rescaled, ``y_i = (xq @ q_i) * sx * s_i``;
* backward (the kernels take no gradient): ``g = [dy_1 * s_1 | dy_2 * s_2 | ...]``;
  ``"fp8"`` casts ``g`` once, per row, to e5m2 (``sg = amax|g| / 57344``) and
  ``dx = (e5m2(g / sg) @ [q_1 | ...]ᵀ) * sg`` is one fp8 GEMM whose contraction
  also sums the kernels' contributions; ``"upcast"`` computes the same
  ``g @ [q_1 | ...]ᵀ`` in the compute dtype, the codes converted, ``g`` not rounded.

Why: each cast is two passes over its input (the row absmax, then the
convert) and XLA does not merge the casts of separate calls on the same ``x``,
so one cast per input instead of one per kernel removes whole passes; one
wide GEMM instead of three (k/v are narrow) runs closer to peak, and one
``dx`` output replaces several written and summed. One per-row scale for the
whole group costs nothing in precision: e4m3 and e5m2 are floating point, so
a smaller row (e.g. k's gradient beside q's) keeps its relative precision
unless it falls more than 2**14 (e4m3) or 2**29 (e5m2) below the row's absmax.

With adapters (``fp8_lora_matmuls``), each kernel also has a low-rank pair
``(A_i [in, r_i], B_i [r_i, out_i])`` (scaling folded into A) and the same
custom backward does the adapters' work the low-rank way for the whole group:
``h = x @ [A_1 | A_2 | ...]`` once, ``y_i += h_i @ B_i``; backward
``dh = [dy_1 B_1ᵀ | ...]``, ``dA = xᵀ dh`` (one matmul), ``dB_i = h_iᵀ dy_i``
(``jlora.nn.low_rank_grads``, shared with the bf16 fused matmul), and
``dx`` gets ``dh @ [A_1 | ...]ᵀ`` added to the fp8 GEMM's output in one pass,
where plain autodiff writes and sums one ``dx`` per adapter.

Rounding: ``y`` per element within 2**-4 relative per product from ``x``'s
e4m3 cast (plus the kernel's own rounding, see ``jlora.quant``); ``dx`` 2**-3
relative per product from the e5m2 cast with ``"fp8"``, none with ``"upcast"``.
On GPUs with fp8 tensor cores (H100) XLA runs these GEMMs as cuBLASLt fp8
calls; elsewhere it upcasts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlora.nn import cat_parts, low_rank_grads
from jlora.quant._formats import FP8_MAX

E5M2_MAX = float(jnp.finfo(jnp.float8_e5m2).max)
FP8_BACKWARDS = ("fp8", "upcast")


def check_backward(backward: str) -> str:
  if backward not in FP8_BACKWARDS:
    raise ValueError(f"Unknown fp8 backward {backward!r}; use 'fp8' (the gradient cast to e5m2, an fp8 "
                     "GEMM) or 'upcast' (the e4m3 kernel converted to the compute dtype).")
  return backward


def dot(x, w, contract_w: int, dtype):
  """``x [..., k]`` contracted with axis ``contract_w`` of the 2-D ``w``."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (contract_w,)), ((), ())),
                             preferred_element_type=dtype)


def to_fp8(x, fp8_dtype, fp8_max):
  """``x`` scaled per row into ``fp8_dtype``: ``(codes, scale [..., 1])``."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / fp8_max, 1.0)
  return (x.astype(jnp.float32) / scale).astype(fp8_dtype), scale


def _codes(kernels):
  """The e4m3 codes of every kernel side by side, ``[in, sum(out_i)]``."""
  return cat_parts([q for q, _ in kernels])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmuls(x: jax.Array, kernels: tuple, dtype, backward: str = "fp8") -> tuple[jax.Array, ...]:
  """``x [..., in] @ W_i`` for every ``(codes [in, out_i] e4m3, scale [1, out_i])`` in ``kernels``.

  ``x`` is in ``dtype``; returns one ``[..., out_i]`` array in ``dtype`` per
  kernel. ``backward``: ``"fp8"`` or ``"upcast"`` (see the module doc).
  """
  xq, x_scale = to_fp8(x, jnp.float8_e4m3fn, FP8_MAX)
  y = dot(xq, _codes(kernels), 0, dtype).astype(jnp.float32) * x_scale  # the scales come after the GEMM
  outs, start = [], 0
  for q, scale in kernels:
    width = q.shape[-1]
    outs.append((y[..., start:start + width] * scale[0]).astype(dtype))
    start += width
  return tuple(outs)


def _forward(x, kernels, dtype, backward):
  return fp8_matmuls(x, kernels, dtype, backward), kernels


def _backward(dtype, backward, kernels, gs):
  """``dx = sum_i (dy_i * s_i) @ q_iᵀ`` as one GEMM; the frozen kernels get no gradient."""
  scaled = [g.astype(jnp.float32) * scale[0] for g, (_, scale) in zip(gs, kernels)]
  g = cat_parts(scaled)
  codes = _codes(kernels)
  if backward == "upcast":
    dx = dot(g.astype(dtype), codes.astype(dtype), 1, dtype)
  else:
    gq, g_scale = to_fp8(g, jnp.float8_e5m2, E5M2_MAX)
    dx = dot(gq, codes, 1, dtype).astype(jnp.float32) * g_scale
  return dx.astype(dtype), None


fp8_matmuls.defvjp(_forward, _backward)


def _low_rank(h, b_parts, dtype):
  """``h_i @ B_i`` per kernel from ``h = x @ [A_1 | ...]``; None where ``r_i = 0``."""
  outs, start = [], 0
  for b in b_parts:
    rank = b.shape[0]
    outs.append(dot(h[..., start:start + rank], b.astype(dtype), 0, dtype) if rank else None)
    start += rank
  return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fp8_lora_matmuls(x: jax.Array, kernels: tuple, a_parts: tuple, b_parts: tuple, dtype,
                     backward: str = "fp8") -> tuple[jax.Array, ...]:
  """``x @ W_i + (x @ A_i) @ B_i`` for every fp8 kernel ``(codes, scale)`` and its ``(A_i, B_i)``.

  ``x [..., in]`` in ``dtype``; ``A_i [in, r_i]`` (scaling folded in),
  ``B_i [r_i, out_i]``, ``r_i`` may be 0. Returns ``[..., out_i]`` arrays in
  ``dtype``. Gradients reach ``x``, the A's and the B's; see the module doc.
  """
  return _lora_forward(x, kernels, a_parts, b_parts, dtype, backward)[0]


def _lora_forward(x, kernels, a_parts, b_parts, dtype, backward):
  ys = fp8_matmuls(x, kernels, dtype, backward)
  h = dot(x, cat_parts([a.astype(dtype) for a in a_parts]), 0, dtype)
  deltas = _low_rank(h, b_parts, dtype)
  ys = tuple(y if d is None else y + d for y, d in zip(ys, deltas))
  return ys, (x, kernels, a_parts, b_parts, h)


def _lora_backward(dtype, backward, residuals, dys):
  x, kernels, a_parts, b_parts, h = residuals
  dx, _ = _backward(dtype, backward, kernels, dys)
  dh, da_parts, db_parts = low_rank_grads(x, h, [dy.astype(dtype) for dy in dys], a_parts, b_parts, dtype)
  if dh.shape[-1]:
    dx = (dx.astype(jnp.float32) + dot(dh, cat_parts([a.astype(dtype) for a in a_parts]), 1, dtype)).astype(x.dtype)
  return dx, None, da_parts, db_parts


fp8_lora_matmuls.defvjp(_lora_forward, _lora_backward)
