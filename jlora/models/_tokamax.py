"""tokamax attention: Google's Pallas flash-attention kernels as an opt-in attention backend.

``attention="tokamax"`` runs tokamax's Pallas Mosaic GPU flash attention
(Hopper and Blackwell GPUs; forward and backward are Pallas kernels, GQA
native) instead of cuDNN's. ``attention="tokamax_xla"`` runs tokamax's own
XLA reference implementation through the same op, mask and custom VJP on any
backend; it exists so that CPU tests exercise everything but the kernel.

Why opt-in, not the default: on an H100 cuDNN's flash attention is the
fastest known kernel for these shapes; tokamax is worth having where it wins
(measured side by side by ``bench/bench.py run --suite tokamax``) and because
its packed-row mask goes through a documented mask type rather than the
private cuDNN layout jax reaches only through ``jax._src``.

Packed rows and sliding windows become tokamax's ``Mask(k_start=..,
is_causal=True)``: query ``t`` sees keys ``k_start[t] .. t``, where
``k_start`` is the start of ``t``'s run of equal segment ids (and at most
``sliding_window - 1`` keys back). The kernel skips key blocks wholly before
a query block's smallest ``k_start``, so short records cost less than a full
causal row.

tokamax is an optional dependency (``pip install 'jlora[tokamax]'``),
imported only when one of these backends is chosen. Its packed-row mask type
lives in ``tokamax._src`` (the public ``tokamax.dot_product_attention`` takes
only dense masks), so the extra pins tokamax below 0.1. tokamax 0.0.12, the
newest release, builds its kernels with a Pallas argument jax 0.11 removed:
under jax >= 0.11 ``attention="tokamax"`` is refused up front
(``kernels_build_here``); ``"tokamax_xla"`` is unaffected.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

from jlora.models._remat import keep_fused_residuals
from jlora.models._segments import segment_positions

INSTALL = "pip install 'jlora[tokamax]'"


def available() -> bool:
  """Whether tokamax imports here."""
  try:
    _modules()
  except ImportError:
    return False
  return True


@functools.cache
def _modules():
  from absl import flags
  from tokamax._src.ops.attention import base

  # tokamax reads its options from absl flags and, unless a program parsed them
  # already, parses sys.argv on first use: a host program's own arguments
  # (``jlora train --config ...``, pytest's) would be rejected as unknown flags.
  # Its defaults are what we want, so take them as parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return base


def kernels_build_here() -> bool:
  """Whether tokamax's Mosaic GPU kernels can be built with this jax.

  tokamax (up to 0.0.12) calls ``jax.experimental.pallas.mosaic_gpu.kernel``
  with ``out_shape=``, which jax 0.11 renamed ``out_type``; with such a jax
  every kernel call fails deep inside Pallas with a TypeError.
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu

  return "out_shape" in inspect.signature(plgpu.kernel).parameters


def require(name: str = "tokamax") -> None:
  """Raise one clear error if tokamax cannot run here (``name``: the attention asked for).

  Refused: tokamax not installed, or (for the ``"tokamax"`` kernels) a jax
  its kernels do not build with.
  """
  if not available():
    raise ValueError(f"attention={name!r} needs the tokamax package, which is not installed; run {INSTALL} "
                     "or use attention='auto'.")
  if name == "tokamax" and not kernels_build_here():
    raise ValueError(f"attention='tokamax' cannot run with jax {jax.__version__}: tokamax's Mosaic GPU kernels "
                     "pass `out_shape=` to Pallas, which this jax no longer takes. Use attention='auto' (cuDNN "
                     "flash attention), or jax<0.11 for tokamax's kernels.")


@functools.cache
def _op(implementation: str):
  """tokamax's attention op: ``"mosaic"`` (Pallas Mosaic GPU kernels) or ``"xla"`` (its reference, any backend)."""
  base = _modules()
  if implementation == "xla":
    return base.DotProductAttention(vjp=base.DotProductAttentionVjp())
  from tokamax._src.ops.attention import pallas_mosaic_gpu

  return pallas_mosaic_gpu.PallasMosaicGpuFlashAttention()


def key_start(segment_ids: jax.Array | None, sliding_window: int | None, length: int) -> jax.Array | None:
  """``[B or 1, T]`` int32: the first key each query may see (None: causal from key 0).

  The start of the query's run of equal segment ids, raised to
  ``t - sliding_window + 1`` under a window.
  """
  t = jnp.arange(length, dtype=jnp.int32)
  start = None
  if segment_ids is not None:
    start = t[None] - segment_positions(segment_ids)
  if sliding_window is not None:
    window = jnp.maximum(t - (sliding_window - 1), 0)[None]
    start = window if start is None else jnp.maximum(start, window)
  return start


def tokamax_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                      sliding_window: int | None, scale: float | None, *, implementation: str = "mosaic",
                      soft_cap: float | None = None) -> jax.Array:
  """Causal attention ``q [B, T, H, D]``, ``k, v [B, T, K, D]`` → ``[B, T, H, D]`` through tokamax.

  ``segment_ids [B, T]`` keep queries within their run of equal ids;
  ``sliding_window`` keeps them within that many keys back (themselves
  included). ``implementation``: ``"mosaic"`` (the GPU kernels; bf16 or fp16
  inputs) or ``"xla"`` (tokamax's reference; any backend and dtype).
  ``soft_cap``: logits become ``cap * tanh(logits / cap)`` inside the kernel (Gemma 2).
  """
  base = _modules()
  if implementation == "mosaic" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention='tokamax' runs bf16/fp16 kernels, but the activations are {q.dtype}; load the "
                     "model with dtype bfloat16, or use attention='auto'.")
  start = key_start(segment_ids, sliding_window, q.shape[1])
  mask = base.Mask(k_start=None if start is None else start[:, None, :], is_causal=True)
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  return _op(implementation)(q, k, v, mask=mask, logits_scale=scale, logits_soft_cap=soft_cap)


def is_tokamax_attention(eqn_params: dict) -> bool:
  """Whether a ``remat_opt`` equation (a custom_vjp with remat optimisation) is tokamax's attention.

  tokamax traces each op under a name scope ``tokamax:{"op": {"__type":
  "tokamax._src.ops.attention...`` that the equations inside keep.
  """
  return any("tokamax._src.ops.attention" in str(e.source_info.name_stack)
             for e in _equations(eqn_params.get("fwd_jaxpr")))


def _equations(jaxpr):
  """Every equation of ``jaxpr`` (a Jaxpr or ClosedJaxpr) and of the jaxprs in its equations' parameters."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in getattr(jaxpr, "eqns", ()):
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _equations(sub)


keep_fused_residuals(is_tokamax_attention)
