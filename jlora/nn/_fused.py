"""A LoRA matmul with its own backward pass: ``y_p = x @ W_p + (x @ A_p) @ B_p`` for projections sharing x.

Plain autodiff of ``x@W + s·(x@A)@B`` runs two narrow, memory-bound matmuls
and an add in each direction, each writing and re-reading an activation-sized
array. ``lora_matmul`` computes the same sum with fewer passes, in one of
three ways (``MATMUL_MODES``; ``"plain"`` is plain autodiff, outside this function):

- ``"exact"``, above ``merge_threshold`` tokens, **stacks the
  adapter onto the frozen matmul's contraction**: ``y = [x | h] · [W ; B]``
  with ``h = x·A``. ``x`` is written once into an ``[T, in + R]`` buffer whose
  last ``R`` columns start at zero, so ``h = [x | 0]·[A ; 0]`` reads it as is;
  ``h`` is written into those columns in place and one GEMM over
  ``K = in + R`` yields ``x·W + h·B`` with a single float32 accumulation and
  a single rounding to the compute dtype (plain rounds ``x·W``, ``h·B`` and
  their sum). Backward the same way: ``dx = [dy | dh] · [Wᵀ ; Aᵀ]`` with
  ``dh = dy·Bᵀ`` written into the padded ``dy``; ``dA = xᵀ·dh`` and
  ``dB = hᵀ·dy`` the low-rank way. No activation-sized sum or delta is
  written; the weights pay one ``[W ; B]`` (``[W | A]`` backward) copy per
  pass, 4 bytes per bf16 parameter. Below the threshold, the unmerged sum
  with the low-rank backward below (no weight copy: decoding, short prompts).
  On an H100 under XLA it trains slower than ``"plain"`` (bench/NOTES.md,
  entry 24): the padded buffers cost more passes than the sums they save.
- ``"auto"`` (fast) multiplies ``x`` by the kernel merged on the fly,
  ``W' = W + A·B`` rounded to the compute dtype, above the threshold:
  in bf16 an update smaller than half of W's spacing (``2**-9·|W|``) is lost
  from the forward pass and from ``dx`` (as ``"plain"`` loses one below half
  of y's spacing in its final bf16 add); ``"fused"`` always merges.
- every mode's low-rank backward: ``dA = xᵀ·(dy·Bᵀ)`` and ``dB = (x·A)ᵀ·dy``
  (``low_rank_grads``); the frozen kernels get a gradient only when
  something differentiates them.

Several projections of the same input (q/k/v, gate/up) pass together: their
adapters' ``x @ A`` become one matmul over the concatenated A's and, stacked or
merged, their kernels one matmul over ``[W_q | W_k | W_v]`` (with the B's
block-diagonal). The scaling is folded into A by the caller; factors keep
their own dtype (fp32 grads), the matmuls run in the compute dtype.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

MATMUL_MODES = ("auto", "fused", "plain", "exact")
"""``"auto"``: merge ``W + A·B`` on the fly above ``merge_threshold`` tokens (rounds the update into
W's dtype); ``"fused"``: always merge on the fly; ``"plain"``: the unfused ``x@W + s·(x@A)@B`` under
plain autodiff; ``"exact"``: ``[x | x·A]·[W ; B]`` above the threshold (one rounding of the sum)."""

STACK_ALIGN = 8
"""The stacked contraction's adapter columns are padded with zeros to a multiple of this (16-byte
rows in bf16, which cuBLAS' tensor-core paths want)."""


def check_matmul_mode(mode: str) -> str:
  if mode not in MATMUL_MODES:
    raise ValueError(f"LoRA matmul mode {mode!r} is unknown; use one of {', '.join(MATMUL_MODES)}.")
  return mode


def merge_threshold(d_in: int, d_out: int) -> float:
  """Tokens above which a weight-sized pass (``x @ (W + A·B)``, ``[x|h]·[W;B]``) beats ``x@W + (x@A)@B``.

  Forming ``W'`` (or ``[W ; B]``) reads W and writes a copy (``2·in·out``
  elements); the unmerged sum reads x once more and reads and writes y once
  more (``T·(in + 2·out)``).
  """
  return 2 * d_in * d_out / (d_in + 2 * d_out)


def strategy(mode: str, tokens: int, d_in: int, d_out: int) -> str:
  """How ``lora_matmul`` computes in ``mode`` at this size: ``"stack"``, ``"merge"`` or ``"unmerged"``."""
  check_matmul_mode(mode)
  if mode == "fused":
    return "merge"
  if mode == "plain" or tokens <= merge_threshold(d_in, d_out):
    return "unmerged"
  return "stack" if mode == "exact" else "merge"


def lora_matmul(x: jax.Array, kernels: Sequence[jax.Array], factors: Sequence[tuple[jax.Array, jax.Array]],
                *, mode: str = "auto", dtype=None, precision=None) -> tuple[jax.Array, ...]:
  """``x @ W_p + (x @ A_p) @ B_p`` for each projection p.

  Args:
    x: ``[..., in]``.
    kernels: per projection, ``W_p [in, out_p]`` (frozen base kernels).
    factors: per projection, ``(A_p [in, r_p], B_p [r_p, out_p])`` with the
      scaling already in A (``r_p`` may be 0 for a projection without adapter).
    mode: ``"exact"``, ``"auto"`` or ``"fused"`` (see ``MATMUL_MODES``).
    dtype: compute dtype (default: x's).
  Returns:
    One ``[..., out_p]`` array per projection, in the compute dtype.
  """
  dtype = dtype or x.dtype
  d_in = x.shape[-1]
  tokens = math.prod(x.shape[:-1])
  how = strategy(mode, tokens, d_in, sum(w.shape[-1] for w in kernels))
  if how == "stack" and not sum(a.shape[-1] for a, _ in factors):
    how = "unmerged"  # no adapter: nothing to stack
  flat = x.reshape(tokens, d_in)
  a_parts = tuple(a for a, _ in factors)
  b_parts = tuple(b for _, b in factors)
  ys = _lora_matmul(how, jnp.dtype(dtype), precision, flat, tuple(kernels), a_parts, b_parts)
  return tuple(y.reshape(x.shape[:-1] + (y.shape[-1],)) for y in ys)


def low_rank_grads(x: jax.Array, h: jax.Array, dys: Sequence[jax.Array], a_parts: Sequence[jax.Array],
                   b_parts: Sequence[jax.Array], dtype, precision=None):
  """The adapters' part of the backward pass of ``y_p = ... + h_p @ B_p`` with ``h = x @ [A_1 | A_2 | ...]``.

  Args:
    x: ``[..., in]``; h: ``[..., R]``; dys: per projection ``[..., out_p]``
      (all in the compute ``dtype``); ``A_p [in, r_p]``, ``B_p [r_p, out_p]``.
  Returns:
    ``(dh, da_parts, db_parts)``: ``dh = [dy_1·B_1ᵀ | ...]`` ``[..., R]`` in
    ``dtype`` (the caller adds ``dh·Aᵀ`` to its ``dx``), ``dA_p = xᵀ·dh_p`` and
    ``dB_p = h_pᵀ·dy_p`` accumulated in float32, each in its factor's dtype.
  """
  ranks = [a.shape[-1] for a in a_parts]
  lead = tuple(range(x.ndim - 1))
  over_tokens = lambda u, v: jax.lax.dot_general(u, v, ((lead, lead), ((), ())), precision=precision,
                                                preferred_element_type=jnp.float32)
  dh = cat_parts([_dot(dy, b.astype(dtype).T, precision) for dy, b in zip(dys, b_parts)])
  da = over_tokens(x, dh)
  da_parts = tuple(d.astype(a.dtype) for d, a in zip(_split(da, ranks), a_parts))
  db_parts = tuple(over_tokens(h_p, dy).astype(b.dtype) for h_p, dy, b in zip(_split(h, ranks), dys, b_parts))
  return dh, da_parts, db_parts


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
  w = cat_parts([w.astype(dtype) for w in kernels])
  ranks = sum(a.shape[-1] for a in a_parts)
  if not ranks:
    return w
  return _dot(cat_parts([a.astype(dtype) for a in a_parts]), _block_diagonal(b_parts, dtype), None, dtype) + w


def _block_diagonal(b_parts, dtype, rows: int = 0):
  """``B_1 ⊕ B_2 ⊕ ...``: ``[R, out_1 + out_2 + ...]`` with ``B_p`` in rows ``r_p``, columns ``out_p``.

  ``rows``: at least this many rows (zeros below).
  """
  total = sum(b.shape[-1] for b in b_parts)
  parts, offset = [], 0
  for b in b_parts:
    parts.append(b.astype(dtype) if len(b_parts) == 1 else
                 jnp.pad(b.astype(dtype), ((0, 0), (offset, total - offset - b.shape[-1]))))
    offset += b.shape[-1]
  out = cat_parts(parts, axis=0)
  return jnp.pad(out, ((0, max(rows - out.shape[0], 0)), (0, 0))) if rows > out.shape[0] else out


def cat_parts(parts, axis=-1):
  """``parts`` concatenated along ``axis`` (a single part as is, no copy)."""
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _split(y, sizes):
  if len(sizes) == 1:
    return (y,)
  offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
  return tuple(y[..., offsets[i]:offsets[i + 1]] for i in range(len(sizes)))


def _stacked_rank(a_parts):
  ranks = sum(a.shape[-1] for a in a_parts)
  return -(-ranks // STACK_ALIGN) * STACK_ALIGN


def _with_columns(u, extra, fill_columns):
  """``[u | fill]``: ``u [T, n]`` padded with ``extra`` zero columns, then ``fill_columns(padded)`` written
  into them in place. The fill reads the zero-padded buffer (its zero columns contribute nothing), so
  ``u`` exists once, inside the buffer, and no ``[T, n + extra]`` concatenation copy is made."""
  padded = jnp.pad(u, ((0, 0), (0, extra)))
  fill = fill_columns(padded)
  return jax.lax.dynamic_update_slice(padded, fill.astype(u.dtype), (0, u.shape[-1])), fill


def _stack_forward(dtype, precision, x, kernels, a_parts, b_parts):
  """``[x | h] · [W ; B̃]`` with ``h = x·[A_1 | ...]``: ``(ys, xh)``, ``xh = [x | h]`` ``[T, in + R]``."""
  rank = _stacked_rank(a_parts)
  a = jnp.pad(cat_parts([a.astype(dtype) for a in a_parts]), ((0, rank), (0, rank - sum(p.shape[-1] for p in a_parts))))
  xh, _ = _with_columns(x.astype(dtype), rank, lambda buf: _dot(buf, a, precision))
  w = jnp.concatenate([cat_parts([w.astype(dtype) for w in kernels]), _block_diagonal(b_parts, dtype, rank)], axis=0)
  return _split(_dot(xh, w, precision), [w.shape[-1] for w in kernels]), xh


def _stack_backward(dtype, precision, xh, kernels, a_parts, b_parts, dys):
  """``(dx, da_parts, db_parts)`` of ``_stack_forward``: ``dx = [dy | dh]·[Wᵀ ; Aᵀ]``, ``dh = dy·B̃ᵀ``."""
  rank = xh.shape[-1] - kernels[0].shape[0]
  d_in, ranks = kernels[0].shape[0], [a.shape[-1] for a in a_parts]
  contract_last = lambda u, v, out=None: jax.lax.dot_general(
      u, v, (((u.ndim - 1,), (v.ndim - 1,)), ((), ())), precision=precision, preferred_element_type=out)
  over_tokens = lambda u, v: jax.lax.dot_general(u, v, (((0,), (0,)), ((), ())), precision=precision,
                                                preferred_element_type=jnp.float32)
  b = _block_diagonal(b_parts, dtype, rank)  # [rank, out]
  dy = cat_parts(dys)
  dyh, dh = _with_columns(dy, rank, lambda buf: contract_last(buf, jnp.pad(b, ((0, 0), (0, rank)))))
  a = jnp.pad(cat_parts([a.astype(dtype) for a in a_parts]), ((0, 0), (0, rank - sum(ranks))))
  dx = contract_last(dyh, jnp.concatenate([cat_parts([w.astype(dtype) for w in kernels]), a], axis=1))
  # Whole-buffer products, sliced after: a column slice of [x | h] or [dy | dh] as a GEMM operand would
  # be copied first (T x in); the extra rows and columns are rank-sized.
  da = over_tokens(xh, dh)[:d_in]
  db = over_tokens(xh[:, d_in:], dyh)[:, :dy.shape[-1]]  # [rank, out]: B̃'s blocks are the B's gradients
  da_parts, db_parts, r0, o0 = [], [], 0, 0
  for a_p, b_p in zip(a_parts, b_parts):
    r, o = a_p.shape[-1], b_p.shape[-1]
    da_parts.append(da[:, r0:r0 + r].astype(a_p.dtype))
    db_parts.append(db[r0:r0 + r, o0:o0 + o].astype(b_p.dtype))
    r0, o0 = r0 + r, o0 + o
  return dx, tuple(da_parts), tuple(db_parts)


def _forward(how, dtype, precision, x, kernels, a_parts, b_parts):
  """``(ys, residual)``: the residual is ``[x | h]`` when stacked, else ``(x, h)``."""
  x = x.astype(dtype)
  if how == "stack":
    return _stack_forward(dtype, precision, x, kernels, a_parts, b_parts)
  ranks = [a.shape[-1] for a in a_parts]
  h = _dot(x, cat_parts([a.astype(dtype) for a in a_parts]), precision)
  if how == "merge":
    y = _dot(x, _merged(kernels, a_parts, b_parts, dtype), precision)
    ys = _split(y, [w.shape[-1] for w in kernels])
  else:
    ys = tuple(_dot(x, w.astype(dtype), precision) + _dot(h_p, b.astype(dtype), precision)
               if b.shape[0] else _dot(x, w.astype(dtype), precision)
               for w, h_p, b in zip(kernels, _split(h, ranks), b_parts))
  return ys, (x, h)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lora_matmul(how, dtype, precision, x, kernels, a_parts, b_parts):
  return _forward(how, dtype, precision, x, kernels, a_parts, b_parts)[0]


def _fwd(how, dtype, precision, x, kernels, a_parts, b_parts):
  value = lambda tree: jax.tree.map(lambda p: p.value, tree)
  x_v, kernels_v, a_v, b_v = value(x), value(kernels), value(a_parts), value(b_parts)
  ys, saved = _forward(how, dtype, precision, x_v, kernels_v, a_v, b_v)
  kernel_grads = tuple(w.perturbed for w in kernels)
  return ys, (jnp.zeros((0,), x_v.dtype), saved, kernels_v, a_v, b_v, kernel_grads if any(kernel_grads) else None)


def _bwd(how, dtype, precision, res, dys):
  x_like, saved, kernels, a_parts, b_parts, kernel_grads = res  # x_like: empty, in x's dtype
  dys = [jnp.zeros(_saved_tokens(saved) + w.shape[-1:], dtype) if isinstance(dy, SymbolicZero)
         else dy.astype(dtype) for dy, w in zip(dys, kernels)]
  if how == "stack":
    dx, da_parts, db_parts = _stack_backward(dtype, precision, saved, kernels, a_parts, b_parts, dys)
    x = saved[:, :kernels[0].shape[0]]
  else:
    x, h = saved
    dh, da_parts, db_parts = low_rank_grads(x, h, dys, a_parts, b_parts, dtype, precision)
    if how == "merge":
      dx = _dot(cat_parts(dys), _merged(kernels, a_parts, b_parts, dtype).T, precision)
    else:
      dx = _dot(dh, cat_parts([a.astype(dtype) for a in a_parts]).T, precision)
      for dy, w in zip(dys, kernels):
        dx = dx + _dot(dy, w.astype(dtype).T, precision)
  if kernel_grads is None:
    dkernels = tuple(None for _ in kernels)
  else:
    dkernels = tuple(_dot(x.T, dy, precision, jnp.float32).astype(w.dtype) if wanted else None
                     for dy, w, wanted in zip(dys, kernels, kernel_grads))
  return dx.astype(x_like.dtype), dkernels, da_parts, db_parts


def _saved_tokens(saved) -> tuple[int, ...]:
  """The token count of the saved input, ``(T,)``."""
  return (saved if not isinstance(saved, tuple) else saved[0]).shape[:1]


_lora_matmul.defvjp(_fwd, _bwd, symbolic_zeros=True)
