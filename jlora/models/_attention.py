"""Masks, norms and the attention kernels shared by every model family.

Attention runs on one of these implementations, picked per call by
``AttentionMask.implementation`` (a model's ``attention`` attribute):

- ``"auto"``: Pallas splash attention on TPU, cuDNN's fused flash attention
  on GPU (bf16/fp16, head_dim <= 128), XLA's attention elsewhere;
- ``"xla"``: ``jax.nn.dot_product_attention`` with a materialised
  ``[B, 1, T, S]`` mask where one is needed (segments, a window, padding);
- ``"cudnn"``: cuDNN flash attention; packed rows use cuDNN's packed layout
  (segment offsets and lengths), which jax 0.10 reaches only through
  ``jax._src.cudnn`` (``jax.nn.dot_product_attention`` takes no segment ids).
  That layout needs a Hopper or newer GPU; on older ones ``"auto"`` gives
  packed rows XLA's attention with a ``[B, 1, T, T]`` mask. The layout sizes
  its buffers by a static bound on the records per row
  (``AttentionMask.max_segments``, a model's ``max_segments`` attribute, which
  ``jlora.train`` sets from its rows): its backward holds about
  ``10 · B · T · heads · head_dim`` bytes per record it makes room for. Up to
  ``RAGGED_MAX_SEGMENTS`` records it is used (it skips the blocks that cross
  records); with more, or no bound given, cuDNN takes a dense ``[B, 1, T, T]``
  same-record mask as a bias (no bound, no skipping);
- ``"splash"``: JAX's Pallas TPU splash attention (``jlora.models._splash``);
  ``"splash_interpret"`` runs the same kernel in Pallas interpret mode on any
  backend (slow; for tests).

Calls with a KV cache or an explicit padding mask (generation, evaluation of
left-padded prompts) always take the XLA path: their masks are small or
their queries too short for the fused kernels' blocks.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jlora.models import _tokamax
from jlora.models._config import LayerAttention
from jlora.models._segments import segment_positions, segment_starts  # noqa: F401  (segment_positions re-exported)

ATTENTION = ("auto", "xla", "cudnn", "splash", "splash_interpret", "tokamax", "tokamax_xla")
RAGGED_MAX_SEGMENTS = 16  # cuDNN's packed layout beyond this costs more memory than its skipping saves time
_TARGET = contextvars.ContextVar("jlora_attention_target", default=None)


@contextlib.contextmanager
def target_backend(backend: str):
  """Select attention for ``backend`` (``"tpu"``, ``"gpu"``, ``"cpu"``) instead of this machine's.

  For lowering on one machine for another, e.g. ``jax.export(..., platforms=["tpu"])``
  on a CPU: inside the block ``"auto"`` picks splash attention and
  ``"splash"`` is allowed.
  """
  token = _TARGET.set(backend)
  try:
    yield
  finally:
    _TARGET.reset(token)


def backend() -> str:
  """The backend attention is lowered for: ``target_backend``'s, else ``jax.default_backend()``."""
  return _TARGET.get() or jax.default_backend()


def check_attention(name: str, *, for_backend: bool = False) -> str:
  """``name`` if it is an attention implementation (and, with ``for_backend``, one this backend runs).

  Raises:
    ValueError: an unknown name, or (``for_backend``) ``"splash"`` off TPU,
      ``"cudnn"`` or ``"tokamax"`` off GPU, or a tokamax backend without
      tokamax installed, naming the fix.
  """
  if name not in ATTENTION:
    raise ValueError(f"attention={name!r} is not an attention implementation; use one of {', '.join(ATTENTION)}.")
  if not for_backend:
    return name
  here = backend()
  if name == "splash" and here != "tpu":
    raise ValueError(
        f"attention='splash' runs Pallas TPU kernels, but the backend here is {here!r}. Use attention='auto' "
        "(splash on TPU, cuDNN on GPU, XLA elsewhere), or 'splash_interpret' to run the kernel in Pallas "
        "interpret mode (slow; for tests).")
  if name == "cudnn" and here != "gpu":
    raise ValueError(f"attention='cudnn' needs an NVIDIA GPU, but the backend here is {here!r}; use "
                     "attention='auto' or 'xla'.")
  if name == "tokamax" and here != "gpu":
    raise ValueError(f"attention='tokamax' runs Pallas Mosaic GPU kernels (Hopper or newer), but the backend here "
                     f"is {here!r}; use attention='auto', or 'tokamax_xla' for tokamax's XLA reference.")
  if name.startswith("tokamax"):
    _tokamax.require(name)
  return name


@struct.dataclass
class AttentionMask:
  """What each query may see, in the form the kernels want.

  Attributes:
    dense: ``[B, 1, T, S]`` bool, for calls with a cache or a padding mask
      (then everything else is already folded in), else None. With per-layer
      settings, ``[K, B, 1, T, S]``: one per entry of ``layer_windows``.
    segment_ids: ``[B, T]`` int of packed rows (queries see keys of their
      own segment only; padding is a segment of its own), or None.
    sliding_window: a query sees at most this many keys back (itself included).
    soft_cap: attention logits become ``cap * tanh(logits / cap)`` (Gemma 2), or None.
    rope_table: which of the model's rope tables the layer rotates with.
    implementation: one of ``ATTENTION``.
    max_segments: the most runs of equal ``segment_ids`` a row holds
      (trailing padding counts as one), or None when unknown; picks cuDNN's
      packed layout (see ``cudnn_packed_layout``), which is sized by it. A
      row with more runs makes that path return NaN, never a silently wrong
      mask. The other kernels need no bound.
    layer_table: when layers differ, the small static table of their
      distinct ``LayerAttention`` settings (``sliding_window``, ``soft_cap``
      and ``rope_table`` are then unused), else ``()``.
    layer_kinds: each layer's entry of ``layer_table`` (static, one per layer).
    layer: the entry of the layer being run (a traced int32 scalar that
      ``scan_layers`` scans alongside the layer weights), else None.
  """

  dense: jax.Array | None = None
  segment_ids: jax.Array | None = None
  sliding_window: int | None = struct.field(pytree_node=False, default=None)
  implementation: str = struct.field(pytree_node=False, default="auto")
  max_segments: int | None = struct.field(pytree_node=False, default=None)
  soft_cap: float | None = struct.field(pytree_node=False, default=None)
  rope_table: int = struct.field(pytree_node=False, default=0)
  layer_table: tuple[LayerAttention, ...] = struct.field(pytree_node=False, default=())
  layer_kinds: tuple[int, ...] = struct.field(pytree_node=False, default=())
  layer: jax.Array | None = None

  @property
  def layer_windows(self) -> tuple[int | None, ...]:
    """The window of each entry of ``layer_table``."""
    return tuple(entry.sliding_window for entry in self.layer_table)

  def entry(self, kind: int) -> "AttentionMask":
    """The one-setting mask of entry ``kind`` of ``layer_table``."""
    setting = self.layer_table[kind]
    return self.replace(dense=None if self.dense is None else self.dense[kind],
                        sliding_window=setting.sliding_window, soft_cap=setting.logit_soft_cap,
                        rope_table=setting.rope_table, layer_table=(), layer_kinds=(), layer=None)

  def rope_index(self) -> int | jax.Array:
    """The rope table of the layer being run (a traced scalar under per-layer settings)."""
    if not self.layer_table:
      return self.rope_table
    return jnp.asarray([entry.rope_table for entry in self.layer_table], jnp.int32)[self.layer]


def attention_mask(key_valid: jax.Array, query_slots: jax.Array, num_keys: int,
                   sliding_window: int | None = None) -> jax.Array:
  """Boolean ``[B, 1, T, S]``: query at cache slot ``query_slots [T]`` may see key slot ``s``.

  A key is visible when it is valid (``key_valid [B, S]``, not padding), not in
  the future, and (with a sliding window) fewer than ``sliding_window`` slots
  back. Each query also sees itself, so padded rows stay finite.
  """
  keys = jnp.arange(num_keys)
  q = query_slots[:, None]
  visible = keys[None, :] <= q
  if sliding_window is not None:
    visible &= q - keys[None, :] < sliding_window
  mask = visible[None] & key_valid[:, None, :].astype(bool)
  mask |= keys[None, None, :] == q[None]
  return mask[:, None]


def causal_mask(length: int, segment_ids: jax.Array | None, sliding_window: int | None) -> jax.Array:
  """Boolean ``[B or 1, 1, T, T]``: causal, within a segment, within the window."""
  q, k = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  visible = k <= q
  if sliding_window is not None:
    visible &= q - k < sliding_window
  visible = visible[None]
  if segment_ids is not None:
    visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return visible[:, None]


def _layer_table(layers: Sequence[LayerAttention], window_limit: int | None
                 ) -> tuple[tuple[LayerAttention, ...], tuple[int, ...]]:
  """``(distinct settings, each layer's index into them)``; windows of at least ``window_limit`` become None."""
  if window_limit is not None:
    layers = [dataclasses.replace(layer, sliding_window=None)
              if layer.sliding_window is not None and layer.sliding_window >= window_limit else layer
              for layer in layers]
  table = tuple(dict.fromkeys(layers))
  return table, tuple(table.index(layer) for layer in layers)


def build_mask(attention_mask_2d, cache, key_valid, query_slots, segment_ids, layers: Sequence[LayerAttention],
               implementation: str, length: int, max_segments: int | None = None) -> AttentionMask:
  """The ``AttentionMask`` of one model call (see ``CausalLM.__call__`` for the arguments).

  ``layers`` holds each layer's ``LayerAttention``. A window at least as long
  as the call is dropped (it hides nothing). When every layer ends up with
  the same setting the mask has it directly; otherwise it carries the static
  table and ``scan_layers`` gives each layer its entry.
  """
  if segment_ids is not None and cache is not None:
    raise ValueError("segment_ids describe packed training rows and cannot be used with a KV cache; "
                     "generate one record per row instead.")
  table, kinds = _layer_table(layers, length if cache is None else None)
  single = len(table) <= 1
  only = table[0] if single and table else LayerAttention()
  per_layer = dict(sliding_window=only.sliding_window, soft_cap=only.logit_soft_cap, rope_table=only.rope_table,
                   layer_table=() if single else table, layer_kinds=() if single else kinds)
  if attention_mask_2d is None and cache is None:
    return AttentionMask(segment_ids=segment_ids, implementation=implementation, max_segments=max_segments,
                         **per_layer)

  def dense(window):
    visible = attention_mask(key_valid, query_slots, key_valid.shape[1], window)
    if segment_ids is not None:
      visible &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return visible

  masks = dense(only.sliding_window) if single else jnp.stack([dense(e.sliding_window) for e in table])
  return AttentionMask(dense=masks, implementation=implementation, **per_layer)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
           scale: float | None = None) -> jax.Array:
  """``q [B, T, H, D]``, ``k, v [B, S, K, D]`` → ``[B, T, H, D]`` (K divides H: GQA).

  With per-layer settings (``mask.layer_table``) the layer's entry is
  selected inside the traced program: each distinct setting is traced once.
  """
  if mask.layer_table:
    if mask.layer is None:
      raise ValueError("This AttentionMask holds per-layer settings but no layer; run the layers with scan_layers, "
                       "which gives each layer its entry.")
    branches = [functools.partial(_attend_one, mask=mask.entry(i), scale=scale) for i in range(len(mask.layer_table))]
    return jax.lax.switch(mask.layer, branches, q, k, v)
  return _attend_one(q, k, v, mask, scale)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float | None) -> jax.Array:
  """``attend`` under one setting (no per-layer table)."""
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  cap = mask.soft_cap
  if mask.dense is not None:
    if cap is not None:
      return capped_attention(q, k, v, mask.dense, scale, cap)
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense, scale=scale)
  impl = resolve(mask.implementation, q, cap)
  if impl in ("splash", "splash_interpret"):
    from jlora.models._splash import splash_attention

    return splash_attention(q, k, v, mask.segment_ids, mask.sliding_window, scale,
                            interpret=impl == "splash_interpret", soft_cap=cap)
  if impl in ("tokamax", "tokamax_xla"):
    return _tokamax.tokamax_attention(q, k, v, mask.segment_ids, mask.sliding_window, scale,
                             implementation="mosaic" if impl == "tokamax" else "xla", soft_cap=cap)
  if cap is not None:  # resolve allows this only off GPU/TPU (tests, CPU runs)
    return capped_attention(q, k, v, causal_mask(q.shape[1], mask.segment_ids, mask.sliding_window), scale, cap)
  window = None if mask.sliding_window is None else (mask.sliding_window - 1, 0)
  if impl == "cudnn":
    if mask.segment_ids is not None:
      try:
        return _cudnn_packed(q, k, v, mask, scale)
      except (NotImplementedError, ImportError, TypeError):  # pre-Hopper GPU, or jax moved its private API:
        if mask.implementation != "auto":  # "auto" falls back to XLA's masked path
          raise
        return _xla_packed(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, local_window_size=window,
                                        implementation="cudnn")
  if mask.segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, local_window_size=window)
  return _xla_packed(q, k, v, mask, scale)


def _xla_packed(q, k, v, mask: AttentionMask, scale):
  """XLA's attention over packed rows: a materialised ``[B, 1, T, T]`` causal, same-segment mask."""
  return jax.nn.dot_product_attention(
      q, k, v, mask=causal_mask(q.shape[1], mask.segment_ids, mask.sliding_window), scale=scale)


def capped_attention(q, k, v, mask: jax.Array, scale: float | None, soft_cap: float) -> jax.Array:
  """Soft-capped attention through materialised logits ``[B, H, T, S]`` (transformers' eager order).

  ``mask [B or 1, 1, T, S]`` bool. Logits ``q·k * scale`` in the input dtype
  are capped (``cap * tanh(x / cap)``), masked, soft-maxed in float32 and
  cast back. For short calls (generation, evaluation) and CPU runs; long
  training rows use a kernel that caps inside (splash, tokamax).
  """
  heads, kv_heads, d = q.shape[2], k.shape[2], q.shape[3]
  scale = d ** -0.5 if scale is None else scale
  k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.asarray(scale, q.dtype)
  logits = (jnp.tanh(logits / soft_cap) * soft_cap).astype(q.dtype)
  logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def resolve(implementation: str, q: jax.Array, soft_cap: float | None = None) -> str:
  """The concrete implementation for ``q [B, T, H, D]``: ``"auto"`` picks by backend, others are checked.

  Soft-capped logits (``soft_cap``) need a kernel that caps: splash on TPU,
  tokamax on GPU; cuDNN and XLA's fused attention cannot, and materialised
  ``[T, T]`` logits run out of memory at long rows, so those are refused on
  accelerators (the materialised path serves CPU runs).
  """
  here = backend()
  if soft_cap is not None:
    return _capped_implementation(implementation, q, soft_cap, here)
  if implementation != "auto":
    return check_attention(implementation, for_backend=True)
  if here == "tpu" and q.shape[1] % 128 == 0:
    return "splash"
  head_dim = q.shape[-1]
  if here == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0:
    return "cudnn"
  return "xla"


def _capped_implementation(implementation: str, q: jax.Array, soft_cap: float, here: str) -> str:
  """``resolve`` for soft-capped layers: a kernel that caps, the materialised path on CPU, or one clear refusal."""
  if implementation != "auto":
    name = check_attention(implementation, for_backend=True)
    if name in ("splash", "splash_interpret", "tokamax", "tokamax_xla") or here == "cpu":
      return name
    choice = "'splash'" if here == "tpu" else "'tokamax' (" + _tokamax.INSTALL + ")"
    raise ValueError(f"attention={name!r} cannot soft-cap attention logits (this model caps them at {soft_cap}); "
                     f"use attention='auto' or {choice}.")
  if here == "tpu":
    if q.shape[1] % 128:
      raise ValueError(f"This model soft-caps attention logits (cap {soft_cap}), which on TPU runs splash "
                       f"attention; its rows must be a multiple of 128 tokens, got {q.shape[1]}. Set "
                       "data.seq_len to a multiple of 128.")
    return "splash"
  if here == "gpu":
    if not _tokamax.available():
      raise ValueError(f"This model soft-caps attention logits (cap {soft_cap}); on GPU that needs tokamax's "
                       f"attention (cuDNN cannot cap). Run {_tokamax.INSTALL}.")
    return "tokamax" if _tokamax.kernels_build_here() and q.dtype in (jnp.bfloat16, jnp.float16) else "tokamax_xla"
  return "xla"


def segment_offsets(segment_ids: jax.Array, max_segments: int | None = None) -> tuple[jax.Array, jax.Array]:
  """``(offsets [B, M + 1], lengths [B, M])`` of the runs of equal ids in each row, -1 past the last.

  The layout of cuDNN's packed attention (``jax._src.cudnn``'s
  ``q_offsets`` / ``q_seqlen``): run ``m`` of row ``b`` starts at
  ``offsets[b, m]`` and holds ``lengths[b, m]`` tokens. Trailing padding is
  one more run, so every token belongs to one. ``M`` is ``max_segments``
  (default ``T``, room for any row); runs past the ``M``-th are left out,
  which ``segment_overflow`` detects.
  """
  b, t = segment_ids.shape
  m = t if max_segments is None else min(max_segments, t)
  starts = segment_starts(segment_ids)
  ends = jnp.concatenate([starts[:, 1:], jnp.ones((b, 1), bool)], axis=1)
  first = jax.vmap(lambda s: jnp.nonzero(s, size=m, fill_value=-1)[0])(starts).astype(jnp.int32)
  last = jax.vmap(lambda s: jnp.nonzero(s, size=m, fill_value=-2)[0])(ends).astype(jnp.int32)
  lengths = jnp.where(first >= 0, last - first + 1, -1)
  return jnp.concatenate([first, jnp.full((b, 1), -1, jnp.int32)], axis=1), lengths


def segment_overflow(segment_ids: jax.Array, max_segments: int) -> jax.Array:
  """Scalar bool: some row of ``segment_ids [B, T]`` holds more than ``max_segments`` runs."""
  return jnp.any(jnp.sum(segment_starts(segment_ids), axis=1) > max_segments)


def cudnn_packed_layout(max_segments: int | None) -> str:
  """How cuDNN runs packed rows of at most ``max_segments`` records: ``"ragged"`` or ``"dense"``.

  ``"ragged"``: cuDNN's packed layout, which skips the key blocks of other
  records (faster than unpacked rows) but holds buffers per record slot;
  ``"dense"``: causal flash attention with a ``[B, 1, T, T]`` same-record
  bias, as memory-lean as unpacked rows and about 10% slower (NOTES.md).
  """
  return "ragged" if max_segments is not None and max_segments <= RAGGED_MAX_SEGMENTS else "dense"


def _cudnn_packed(q, k, v, mask: AttentionMask, scale):
  """cuDNN flash attention over packed rows, in the layout ``cudnn_packed_layout`` picks."""
  if cudnn_packed_layout(mask.max_segments) == "ragged":
    return _cudnn_ragged(q, k, v, mask.segment_ids, mask.sliding_window, scale, mask.max_segments)
  return dense_segment_attention(q, k, v, mask.segment_ids, mask.sliding_window, scale)


def dense_segment_attention(q, k, v, segment_ids, sliding_window: int | None, scale,
                            implementation: str = "cudnn") -> jax.Array:
  """Causal attention within each record through a dense same-record mask (cuDNN takes it as a bias)."""
  same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, scale=scale, local_window_size=window,
                                      implementation=implementation)


def _cudnn_ragged(q, k, v, segment_ids, sliding_window, scale, max_segments: int):
  """cuDNN's packed layout (Hopper or newer; raises on older GPUs at trace time).

  Rows with more than ``max_segments`` runs would lose their last records
  from the layout, so the whole output is NaN then, and the loss says so.
  """
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

  offsets, lengths = segment_offsets(segment_ids, max_segments)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  out = dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                              kv_offsets=offsets, scale=scale, mask_type=MaskType.PADDING_CAUSAL,
                              sliding_window_length=sliding_window)
  return jnp.where(segment_overflow(segment_ids, max_segments), jnp.nan, out).astype(out.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"hidden_act={name!r} is not supported; use one of {', '.join(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class RMSNorm(nnx.Module):
  """HF's RMSNorm: normalise in float32, cast back, then scale by ``weight``."""

  def __init__(self, size: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((size,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
  """``torch.nn.LayerNorm`` with ``weight`` and ``bias`` (statistics in float32)."""

  def __init__(self, size: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((size,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((size,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
