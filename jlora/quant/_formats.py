"""Weight formats: NF4, int8 and fp8 (e4m3) kernels with their scales, as pure functions.

A kernel ``[*stack, in, out]`` (Flax layout; ``stack`` is a scanned model's
leading layer axes) becomes a dict of arrays, every one of them shaped
``[*stack, rows, out]`` so that its last two dims follow the kernel's in/out
axes (sharding and ``nnx.scan`` slicing treat them alike):

* ``nf4``: ``qkernel`` uint8 ``[*stack, in/2, out]`` holds two 4-bit codes per
  byte (rows ``2i`` in the low nibble, ``2i+1`` in the high one), each an index
  into the QLoRA paper's NormalFloat4 codebook; ``kernel_scale`` holds the
  absmax of every block of ``block_size`` input rows, ``[*stack, in/block, out]``,
  as float32 (0.5625 byte/param at block 64) or, with double quantization, as
  int8 codes of ``scale - scale_offset`` in steps of ``scale_step`` (both
  float32 ``[*stack, 1, out]``; about 0.52 byte/param).
* ``int8``: ``qkernel`` int8 ``[*stack, in, out]``, symmetric, with one float32
  scale per output channel ``kernel_scale [*stack, 1, out]`` (absmax / 127).
* ``fp8``: ``qkernel`` float8_e4m3fn ``[*stack, in, out]``, with one float32
  scale per output channel ``kernel_scale [*stack, 1, out]`` (absmax / 448).

Rounding error (``dequantize(quantize(w)) - w``), per element: nf4 at most half
the widest codebook gap (0.1519) times the block's absmax (plus the scale's
own rounding with double quantization: half a step, 1/254 of the column's
scale spread); int8 at most half a step, absmax/254 of the column; fp8 at most
2**-4 of the value (3 mantissa bits) or, for values under 2**-6 of the
column's absmax/448 (subnormals), 2**-10 of absmax/448.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("nf4", "int8", "fp8")

NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
"""NormalFloat4 (Dettmers et al. 2023, "QLoRA", appendix E; bitsandbytes' table)."""

_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one layer's kernel is stored (hashable: it is static under ``jit``).

  Attributes:
    format: ``"nf4"``, ``"int8"`` or ``"fp8"``.
    in_features, out_features: the kernel's (unstacked) shape.
    block_size: NF4 rows per absmax scale (ignored by int8/fp8).
    double_quant: NF4 scales stored as int8 codes with a per-column offset/step.
  """

  format: str
  in_features: int
  out_features: int
  block_size: int = 64
  double_quant: bool = False


def check_format(format: str, block_size: int, double_quant: bool | None) -> bool:
  """Validate the options; returns the effective ``double_quant``."""
  if format not in FORMATS:
    raise ValueError(f"Unknown quantization format {format!r}; use one of {', '.join(map(repr, FORMATS))}.")
  if format == "nf4":
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
      raise ValueError(f"block_size={block_size!r} must be an even positive integer (NF4 packs two "
                       "rows per byte); the QLoRA default is 64.")
    return True if double_quant is None else bool(double_quant)
  if double_quant:
    raise ValueError(f"double_quant applies to nf4 only; {format} keeps one float32 scale per output "
                     "channel. Drop double_quant or use format='nf4'.")
  return False


def check_shape(spec: QuantSpec, name: str) -> None:
  """Raise if ``spec``'s block size does not divide the layer's input dimension."""
  if spec.format == "nf4" and spec.in_features % spec.block_size:
    raise ValueError(
        f"{name}: block_size={spec.block_size} does not divide its input dimension {spec.in_features}; "
        f"pick a block_size that divides it (e.g. {_divisor(spec.in_features, spec.block_size)}) or leave "
        "the layer out with targets=.")


def _divisor(n: int, near: int) -> int:
  evens = [d for d in range(2, n + 1, 2) if n % d == 0]
  return min(evens, key=lambda d: abs(d - near)) if evens else 2


def _safe(scale):
  return jnp.where(scale > 0, scale, 1.0)


@functools.partial(jax.jit, static_argnums=(1,))
def quantize(kernel: jax.Array, spec: QuantSpec) -> dict[str, jax.Array]:
  """``kernel [*stack, in, out]`` -> the format's arrays (see the module doc)."""
  w = kernel.astype(jnp.float32)
  if spec.format == "int8":
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
    q = jnp.clip(jnp.round(w / _safe(scale)), -127, 127).astype(jnp.int8)
    return {"qkernel": q, "kernel_scale": scale}
  if spec.format == "fp8":
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / FP8_MAX
    q = jnp.clip(w / _safe(scale), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return {"qkernel": q, "kernel_scale": scale}
  *stack, n_in, n_out = w.shape
  blocks = w.reshape(*stack, n_in // spec.block_size, spec.block_size, n_out)
  scale = jnp.max(jnp.abs(blocks), axis=-2)  # [*stack, in/block, out]
  normed = blocks / _safe(scale)[..., None, :]
  codes = jnp.sum(normed[..., None] > jnp.asarray(_NF4_MIDPOINTS), axis=-1).astype(jnp.uint8)
  codes = codes.reshape(*stack, n_in // 2, 2, n_out)
  out = {"qkernel": codes[..., 0, :] | (codes[..., 1, :] << 4)}
  if not spec.double_quant:
    return out | {"kernel_scale": scale}
  offset = jnp.mean(scale, axis=-2, keepdims=True)
  step = jnp.max(jnp.abs(scale - offset), axis=-2, keepdims=True) / 127.0
  q = jnp.clip(jnp.round((scale - offset) / _safe(step)), -127, 127).astype(jnp.int8)
  return out | {"kernel_scale": q, "scale_offset": offset, "scale_step": step}


def scales(arrays: dict[str, jax.Array], spec: QuantSpec) -> jax.Array:
  """The float32 scales ``[*stack, in/block or 1, out]`` (double quantization undone)."""
  scale = arrays["kernel_scale"]
  if spec.double_quant:
    return scale.astype(jnp.float32) * arrays["scale_step"] + arrays["scale_offset"]
  return scale


def values(arrays: dict[str, jax.Array], spec: QuantSpec, dtype) -> jax.Array:
  """The unscaled kernel values ``[*stack, in, out]`` in ``dtype`` (NF4: codebook entries)."""
  q = arrays["qkernel"]
  if spec.format != "nf4":
    return q.astype(dtype)
  codes = jnp.stack([q & 0xF, q >> 4], axis=-2)  # [*stack, in/2, 2, out]
  codes = codes.reshape(q.shape[:-2] + (2 * q.shape[-2], q.shape[-1]))
  return jnp.take(jnp.asarray(NF4_CODEBOOK, dtype), codes.astype(jnp.int32), axis=0)


def dequantize(arrays: dict[str, jax.Array], spec: QuantSpec, dtype=jnp.float32) -> jax.Array:
  """The kernel ``[*stack, in, out]`` in ``dtype`` that the quantized arrays stand for."""
  w = values(arrays, spec, jnp.float32)
  s = scales(arrays, spec)
  if spec.format == "nf4":
    *stack, n_in, n_out = w.shape
    w = w.reshape(*stack, n_in // spec.block_size, spec.block_size, n_out) * s[..., None, :]
    w = w.reshape(*stack, n_in, n_out)
  else:
    w = w * s
  return w.astype(dtype)


def nbytes(arrays: dict[str, jax.Array]) -> int:
  """Bytes the stored arrays take."""
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays.values())
