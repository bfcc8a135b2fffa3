"""A LoRA matmul with its own backward pass: ``y_p = x @ (W_p + A_p B_p)`` for projections sharing x.

Plain autodiff of ``x@W + s·(x@A)@B`` runs two narrow, memory-bound matmuls
and an add in each direction. ``lora_matmul`` instead

- forward: above ``merge_threshold`` tokens, multiplies ``x`` by the kernel
  merged on the fly, ``W' = W + A·B`` (one big matmul; forming ``W'`` costs
  one pass over W, which beats the extra passes over the activations when
  there are more tokens than about ``2·in·out/(in + 2·out)``); below it, the
  unmerged sum;
- backward: ``dA = xᵀ·(dy·Bᵀ)`` and ``dB = (x·A)ᵀ·dy`` the low-rank way, and
  ``dx = dy·W'ᵀ`` (merged on the fly again above the threshold); the frozen
  kernels get a gradient only when something differentiates them.

Several projections of the same input (q/k/v, gate/up) pass together: their
adapters' ``x @ A`` become one matmul over the concatenated A's and, merged,
their kernels one matmul over ``[W'_q | W'_k | W'_v]``. The scaling is folded
into A by the caller; factors keep their own dtype (fp32 grads), the matmuls
run in the compute dtype.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

MATMUL_MODES = ("auto", "fused", "plain")
"""``"auto"``: merge on the fly above ``merge_threshold`` tokens; ``"fused"``: always
merge on the fly; ``"plain"``: the unfused ``x@W + s·(x@A)@B`` under plain autodiff."""


def check_matmul_mode(mode: str) -> str:
  if mode not in MATMUL_MODES:
    raise ValueError(f"LoRA matmul mode {mode!r} is unknown; use one of {', '.join(MATMUL_MODES)}.")
  return mode


def merge_threshold(d_in: int, d_out: int) -> float:
  """Tokens above which ``x @ (W + A·B)`` moves fewer bytes than ``x@W + (x@A)@B``.

  Merging reads W and writes W' (``2·in·out`` elements); the unmerged sum reads
  x once more and reads and writes y once more (``T·(in + 2·out)``).
  """
  return 2 * d_in * d_out / (d_in + 2 * d_out)


def lora_matmul(x: jax.Array, kernels: Sequence[jax.Array], factors: Sequence[tuple[jax.Array, jax.Array]],
                *, mode: str = "auto", dtype=None, precision=None) -> tuple[jax.Array, ...]:
  """``x @ (W_p + A_p·B_p)`` for each projection p.

  Args:
    x: ``[..., in]``.
    kernels: per projection, ``W_p [in, out_p]`` (frozen base kernels).
    factors: per projection, ``(A_p [in, r_p], B_p [r_p, out_p])`` with the
      scaling already in A (``r_p`` may be 0 for a projection without adapter).
    mode: ``"auto"`` or ``"fused"`` (see ``MATMUL_MODES``).
    dtype: compute dtype (default: x's).
  Returns:
    One ``[..., out_p]`` array per projection, in the compute dtype.
  """
  check_matmul_mode(mode)
  dtype = dtype or x.dtype
  d_in = x.shape[-1]
  tokens = math.prod(x.shape[:-1])
  d_out = sum(w.shape[-1] for w in kernels)
  merge = mode == "fused" or tokens > merge_threshold(d_in, d_out)
  flat = x.reshape(tokens, d_in)
  a_parts = tuple(a for a, _ in factors)
  b_parts = tuple(b for _, b in factors)
  ys = _lora_matmul(merge, jnp.dtype(dtype), precision, flat, tuple(kernels), a_parts, b_parts)
  return tuple(y.reshape(x.shape[:-1] + (y.shape[-1],)) for y in ys)


def _dot(x, y, precision, out=None):
  return jnp.matmul(x, y, precision=precision, preferred_element_type=out)


def _merged(kernels, a_parts, b_parts, dtype):
  """``[W_1 + A_1·B_1 | W_2 + A_2·B_2 | ...]`` in the compute dtype, as one ``A'·B̃ + W`` matmul.

  ``A' = [A_1 | A_2 | ...]`` ``[in, R]`` times the block-diagonal ``B̃``
  ``[R, out_1 + out_2 + ...]`` (its zero blocks add exact zeros) gives every
  delta at once, with its output in the compute dtype and ``W`` added to it:
  the ``add(dot(a, b), c)`` form that XLA's GPU gemm rewriter folds into the
  cuBLAS epilogue (``D = A'·B̃ + 1·W``, accumulated in fp32 and rounded once).
  No fp32 ``[in, out]`` delta is written and read back: forming ``W'`` moves
  about 8 bytes per bf16 parameter (a copy of W that cuBLAS overwrites, or a
  bf16 delta and an add) instead of 12. Where no epilogue takes the add (CPU),
  the delta is rounded to the compute dtype before the add: one more
  rounding, within bf16's own error.
  """
  w = _cat([w.astype(dtype) for w in kernels])
  ranks = sum(a.shape[-1] for a in a_parts)
  if not ranks:
    return w
  return _dot(_cat([a.astype(dtype) for a in a_parts]), _block_diagonal(b_parts, dtype), None, dtype) + w


def _block_diagonal(b_parts, dtype):
  """``B_1 ⊕ B_2 ⊕ ...``: ``[R, out_1 + out_2 + ...]`` with ``B_p`` in rows ``r_p``, columns ``out_p``."""
  if len(b_parts) == 1:
    return b_parts[0].astype(dtype)
  total = sum(b.shape[-1] for b in b_parts)
  rows, offset = [], 0
  for b in b_parts:
    rows.append(jnp.pad(b.astype(dtype), ((0, 0), (offset, total - offset - b.shape[-1]))))
    offset += b.shape[-1]
  return jnp.concatenate(rows, axis=0)


def _cat(parts, axis=-1):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _split(y, sizes):
  if len(sizes) == 1:
    return (y,)
  offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
  return tuple(y[..., offsets[i]:offsets[i + 1]] for i in range(len(sizes)))


def _forward(merge, dtype, precision, x, kernels, a_parts, b_parts):
  x = x.astype(dtype)
  ranks = [a.shape[-1] for a in a_parts]
  h = _dot(x, _cat([a.astype(dtype) for a in a_parts]), precision)
  if merge:
    y = _dot(x, _merged(kernels, a_parts, b_parts, dtype), precision)
    ys = _split(y, [w.shape[-1] for w in kernels])
  else:
    ys = tuple(_dot(x, w.astype(dtype), precision) + _dot(h_p, b.astype(dtype), precision)
               if b.shape[0] else _dot(x, w.astype(dtype), precision)
               for w, h_p, b in zip(kernels, _split(h, ranks), b_parts))
  return ys, h


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lora_matmul(merge, dtype, precision, x, kernels, a_parts, b_parts):
  return _forward(merge, dtype, precision, x, kernels, a_parts, b_parts)[0]


def _fwd(merge, dtype, precision, x, kernels, a_parts, b_parts):
  value = lambda tree: jax.tree.map(lambda p: p.value, tree)
  x_v, kernels_v, a_v, b_v = value(x), value(kernels), value(a_parts), value(b_parts)
  ys, h = _forward(merge, dtype, precision, x_v, kernels_v, a_v, b_v)
  kernel_grads = tuple(w.perturbed for w in kernels)
  return ys, (x_v, kernels_v, a_v, b_v, h, kernel_grads if any(kernel_grads) else None)


def _bwd(merge, dtype, precision, res, dys):
  x, kernels, a_parts, b_parts, h, kernel_grads = res
  x = x.astype(dtype)
  dys = [jnp.zeros(x.shape[:-1] + w.shape[-1:], dtype) if isinstance(dy, SymbolicZero)
         else dy.astype(dtype) for dy, w in zip(dys, kernels)]
  ranks = [a.shape[-1] for a in a_parts]
  dh = _cat([_dot(dy, b.astype(dtype).T, precision) for dy, b in zip(dys, b_parts)])
  da = _dot(x.T, dh, precision, jnp.float32)
  da_parts = tuple(d.astype(a.dtype) for d, a in zip(_split(da, ranks), a_parts))
  db_parts = tuple(_dot(h_p.T, dy, precision, jnp.float32).astype(b.dtype)
                   for h_p, dy, b in zip(_split(h, ranks), dys, b_parts))
  if merge:
    dx = _dot(_cat(dys), _merged(kernels, a_parts, b_parts, dtype).T, precision)
  else:
    dx = _dot(dh, _cat([a.astype(dtype) for a in a_parts]).T, precision)
    for dy, w in zip(dys, kernels):
      dx = dx + _dot(dy, w.astype(dtype).T, precision)
  if kernel_grads is None:
    dkernels = tuple(None for _ in kernels)
  else:
    dkernels = tuple(_dot(x.T, dy, precision, jnp.float32).astype(w.dtype) if wanted else None
                     for dy, w, wanted in zip(dys, kernels, kernel_grads))
  return dx.astype(res[0].dtype), dkernels, da_parts, db_parts


_lora_matmul.defvjp(_fwd, _bwd, symbolic_zeros=True)
