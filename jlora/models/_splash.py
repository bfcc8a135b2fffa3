"""Splash attention: JAX's Pallas TPU flash-attention kernel, with GQA, segment ids and a sliding window.

``jax.experimental.pallas.ops.tpu.splash_attention`` computes one example's
attention for ``[heads, T, D]`` queries against one key/value head
(``make_splash_mqa_single_device``). GQA maps onto it directly: each key/value
head serves its group of ``H / K`` query heads, and ``jax.vmap`` runs the
kernel over the batch and the key/value heads. Packed rows pass their
segment ids; the causal (or causal sliding-window) mask is static, so the
kernel skips the blocks it hides. Sequence lengths must be multiples of 128
(the kernel's block unit); the block size is the largest of 512, 256, 128
that divides the length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from jlora.models._remat import SAVED

BLOCK = 128


def check_length(length: int) -> None:
  if length % BLOCK:
    raise ValueError(f"Splash attention needs a sequence length that is a multiple of {BLOCK}, got {length}; "
                     f"set data.seq_len to a multiple of {BLOCK}, or attention='xla'.")


@functools.lru_cache(maxsize=32)
def _kernel(length: int, group: int, sliding_window: int | None, interpret: bool, soft_cap: float | None = None):
  """The splash kernel for one ``[group, T, D]`` query block against one ``[T, D]`` key/value head."""
  if sliding_window is None:
    one = mask_lib.CausalMask((length, length))
  else:
    one = mask_lib.LocalMask((length, length), window_size=(sliding_window - 1, 0), offset=0)
  block = max(b for b in (512, 256, 128) if length % b == 0)
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                block_kv_dq=block)
  return kernel_lib.make_splash_mqa_single_device(
      mask_lib.MultiHeadMask([one] * group), block_sizes=sizes, residual_checkpoint_name=SAVED,
      attn_logits_soft_cap=soft_cap, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     sliding_window: int | None, scale: float | None, *, interpret: bool = False,
                     soft_cap: float | None = None) -> jax.Array:
  """Causal attention ``q [B, T, H, D]``, ``k, v [B, T, K, D]`` → ``[B, T, H, D]``.

  ``segment_ids [B, T]`` (or None) keep queries within their segment;
  ``sliding_window`` keeps them within that many keys back (themselves
  included). ``soft_cap``: the kernel caps the scaled logits at
  ``cap * tanh(x / cap)`` (Gemma 2), forward and backward. ``interpret`` runs the kernel in Pallas interpret mode (any backend).
  Residuals are named ``SAVED``, so the ``"matmuls"`` remat policy keeps them.
  """
  b, t, heads, d = q.shape
  kv_heads = k.shape[2]
  check_length(t)
  group = heads // kv_heads
  run = _kernel(t, group, sliding_window, interpret, soft_cap)
  scale = d ** -0.5 if scale is None else scale
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if segment_ids is None:
    segment_ids = jnp.zeros((b, t), jnp.int32)

  def row(q_row, k_row, v_row, seg):
    ids = kernel_lib.SegmentIds(q=seg, kv=seg)
    return jax.vmap(lambda qh, kh, vh: run(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

  out = jax.vmap(row)(qg, kh, vh, segment_ids.astype(jnp.int32))  # [B, K, group, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)
