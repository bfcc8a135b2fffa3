"""``QuantizedLinear``: an ``nnx.Linear`` whose kernel is stored quantized and frozen.

The quantized arrays are ``QuantizedWeight`` variables, not ``nnx.Param``, so
nothing that selects parameters (optimizers, ``nnx.Param`` filters, HF weight
export) ever sees them. The kernel is dequantized inside the matmul, one layer
at a time: the forward and backward passes are a ``jax.custom_vjp`` whose only
residuals are the quantized arrays themselves, so training never keeps a
dequantized copy of the weights for the backward pass.

* ``nf4``: codebook lookup times block scales, then a matmul in the compute
  dtype; the dequantized kernel is a transient of one layer (of one scan
  step), which XLA may fuse into the matmul's operand.
* ``int8``: ``(x @ codes) * scale``, the int8 -> compute dtype convert fused
  into the matmul.
* ``fp8``: a real fp8 matmul, ``x`` cast per row to e4m3 with its own scale,
  the e4m3 kernel as is, output rescaled by both scales; the backward pass
  multiplies an e5m2 gradient by the same e4m3 kernel. On GPUs with fp8 tensor
  cores (H100) this is faster than bf16; elsewhere XLA upcasts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.quant import _formats
from jlora.quant._formats import QuantSpec

E5M2_MAX = float(jnp.finfo(jnp.float8_e5m2).max)
ARRAY_NAMES = ("qkernel", "kernel_scale", "scale_offset", "scale_step")
"""Attribute names of a ``QuantizedLinear``'s quantized arrays (all ``[*stack, rows, out]``)."""


class QuantizedWeight(nnx.Variable):
  """A frozen, quantized base-weight array: packed codes or their scales."""


def _dot(x, w, contract_w: int, dtype):
  """``x [..., k]`` contracted with axis ``contract_w`` of the 2-D ``w``."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (contract_w,)), ((), ())),
                             preferred_element_type=dtype)


def _to_fp8(x, fp8_dtype, fp8_max):
  """``x`` scaled per row into ``fp8_dtype``: ``(codes, scale [..., 1])``."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / fp8_max, 1.0)
  return (x.astype(jnp.float32) / scale).astype(fp8_dtype), scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def quantized_matmul(x: jax.Array, arrays: dict, spec: QuantSpec, dtype) -> jax.Array:
  """``x [..., in] @ kernel [in, out]`` for one layer's quantized kernel; ``x`` is in ``dtype``."""
  if spec.format == "nf4":
    return _dot(x, _formats.dequantize(arrays, spec, dtype), 0, dtype)
  scale = arrays["kernel_scale"][0]  # [out]
  if spec.format == "int8":
    return _dot(x, arrays["qkernel"].astype(dtype), 0, dtype) * scale.astype(dtype)
  xq, x_scale = _to_fp8(x, jnp.float8_e4m3fn, _formats.FP8_MAX)
  y = _dot(xq, arrays["qkernel"], 0, dtype)  # the scales are applied after: a plain fp8 GEMM
  return (y.astype(jnp.float32) * x_scale * scale).astype(dtype)


def _forward(x, arrays, spec, dtype):
  return quantized_matmul(x, arrays, spec, dtype), arrays


def _backward(spec, dtype, residuals, g):
  """``dx = g @ kernel.T``; the quantized arrays get no gradient (they are frozen)."""
  arrays = residuals
  g = g.astype(dtype)
  if spec.format == "nf4":
    dx = _dot(g, _formats.dequantize(arrays, spec, dtype), 1, dtype)
  elif spec.format == "int8":
    scaled = g * arrays["kernel_scale"][0].astype(dtype)
    dx = _dot(scaled, arrays["qkernel"].astype(dtype), 1, dtype)
  else:
    gq, g_scale = _to_fp8(g * arrays["kernel_scale"][0], jnp.float8_e5m2, E5M2_MAX)
    dx = _dot(gq, arrays["qkernel"], 1, dtype).astype(jnp.float32) * g_scale
  return dx.astype(dtype), None


quantized_matmul.defvjp(_forward, _backward)


class QuantizedLinear(nnx.Module):
  """A Linear layer ``[*stack, in, out]`` with a quantized, frozen kernel (see the module doc).

  ``y = x @ dequantize(kernel) + bias``, ``x [..., in] -> y [..., out]``.
  Built from an ``nnx.Linear`` with ``from_linear``; ``to_linear`` gives one
  back with the dequantized kernel in the original ``param_dtype``. The bias
  stays the original ``nnx.Param`` (it is frozen like every base parameter).

  Attributes:
    spec: the storage format (``jlora.quant.QuantSpec``).
    qkernel, kernel_scale (and with NF4 double quantization scale_offset,
      scale_step): ``QuantizedWeight`` arrays, see ``jlora.quant`` formats.
  """

  def __init__(self, spec: QuantSpec, arrays: dict, *, bias: nnx.Param | None = None, dtype=None,
               param_dtype=jnp.float32):
    self.spec = spec
    self.in_features = spec.in_features
    self.out_features = spec.out_features
    self.use_bias = bias is not None
    self.bias = bias if bias is not None else nnx.data(None)
    self.dtype = dtype
    self.param_dtype = param_dtype
    for name in ARRAY_NAMES:
      if name in arrays:
        setattr(self, name, QuantizedWeight(arrays[name]))

  @classmethod
  def from_linear(cls, linear: nnx.Linear, spec: QuantSpec) -> "QuantizedLinear":
    """Quantize ``linear``'s kernel (any leading stack dims) into a new layer."""
    arrays = _formats.quantize(linear.kernel[...], spec)
    bias = linear.bias if linear.use_bias else None
    return cls(spec, arrays, bias=bias, dtype=linear.dtype, param_dtype=linear.param_dtype)

  def arrays(self) -> dict[str, jax.Array]:
    """The quantized arrays by name."""
    return {name: getattr(self, name)[...] for name in ARRAY_NAMES if hasattr(self, name)}

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return tuple(self.qkernel.shape[:-2])

  def dequantized_kernel(self, dtype=None) -> jax.Array:
    """The kernel ``[*stack, in, out]`` these arrays stand for (default dtype: ``param_dtype``)."""
    return _formats.dequantize(self.arrays(), self.spec, dtype or self.param_dtype)

  def to_linear(self) -> nnx.Linear:
    """An ``nnx.Linear`` holding the dequantized kernel in ``param_dtype`` (the bias is shared)."""
    spec = self.spec
    linear = nnx.eval_shape(lambda: nnx.Linear(
        spec.in_features, spec.out_features, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, rngs=nnx.Rngs(0)))
    linear.kernel = nnx.Param(self.dequantized_kernel())
    if self.use_bias:
      linear.bias = self.bias
    return linear

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.stack_shape:
      raise ValueError(
          f"This QuantizedLinear holds a stack of {self.stack_shape} layers; call it per layer (e.g. "
          "inside nnx.scan), as the model does with its stacked layers.")
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    y = quantized_matmul(x.astype(dtype), self.arrays(), self.spec, jnp.dtype(dtype))
    if self.use_bias:
      y = y + self.bias[...].astype(dtype)
    return y
