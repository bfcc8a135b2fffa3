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
  multiplies an e5m2 gradient by the same e4m3 kernel (``jlora.quant._fp8``).
  Sibling fp8 layers reading one input (q/k/v, gate/up) share its cast and
  run one GEMM per direction when called through ``jlora.nn.lora_projections``
  (``shared_input``). On GPUs with fp8 tensor cores (H100) this is faster
  than bf16; elsewhere XLA upcasts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.quant import _formats
from jlora.quant._formats import QuantSpec
from jlora.quant._fp8 import check_backward, dot, fp8_matmuls

ARRAY_NAMES = ("qkernel", "kernel_scale", "scale_offset", "scale_step")
"""Attribute names of a ``QuantizedLinear``'s quantized arrays (all ``[*stack, rows, out]``)."""


class QuantizedWeight(nnx.Variable):
  """A frozen, quantized base-weight array: packed codes or their scales."""


def quantized_matmul(x: jax.Array, arrays: dict, spec: QuantSpec, dtype, fp8_backward: str = "fp8") -> jax.Array:
  """``x [..., in] @ kernel [in, out]`` for one layer's quantized kernel; ``x`` is in ``dtype``.

  ``fp8_backward`` (fp8 only): ``"fp8"`` or ``"upcast"``, see ``jlora.quant._fp8``.
  """
  if spec.format == "fp8":
    return fp8_matmuls(x, ((arrays["qkernel"], arrays["kernel_scale"]),), dtype, fp8_backward)[0]
  return _dequantized_matmul(x, arrays, spec, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dequantized_matmul(x, arrays, spec, dtype):
  """nf4 / int8: the kernel dequantized inside the matmul (see the module doc)."""
  if spec.format == "nf4":
    return dot(x, _formats.dequantize(arrays, spec, dtype), 0, dtype)
  return dot(x, arrays["qkernel"].astype(dtype), 0, dtype) * arrays["kernel_scale"][0].astype(dtype)


def _forward(x, arrays, spec, dtype):
  return _dequantized_matmul(x, arrays, spec, dtype), arrays


def _backward(spec, dtype, residuals, g):
  """``dx = g @ kernel.T``; the quantized arrays get no gradient (they are frozen)."""
  arrays = residuals
  g = g.astype(dtype)
  if spec.format == "nf4":
    dx = dot(g, _formats.dequantize(arrays, spec, dtype), 1, dtype)
  else:
    scaled = g * arrays["kernel_scale"][0].astype(dtype)
    dx = dot(scaled, arrays["qkernel"].astype(dtype), 1, dtype)
  return dx.astype(dtype), None


_dequantized_matmul.defvjp(_forward, _backward)


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
    shared_input: fp8: cast the input once for sibling layers that read it
      (``jlora.nn.lora_projections``), one GEMM per direction for all of them.
    fp8_backward: fp8: ``"fp8"`` (the input gradient through an e5m2 x e4m3
      GEMM) or ``"upcast"`` (a GEMM in the compute dtype).
    fused_lora: fp8: LoRA layers over this one compute their adapters inside
      the fp8 matmul's own backward pass (``jlora.quant._fp8.fp8_lora_matmuls``)
      instead of under plain autodiff.
    ``jlora.quant.set_fp8_matmul`` sets these for a whole model.
  """

  shared_input: bool = True
  fp8_backward: str = "fp8"
  fused_lora: bool = True

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
    dtype = self.compute_dtype(x)
    y = quantized_matmul(x.astype(dtype), self.arrays(), self.spec, dtype, self.fp8_backward)
    return self.add_bias(y)

  def compute_dtype(self, x: jax.Array) -> jnp.dtype:
    """The dtype the layer computes in for input ``x`` (``dtype``, else ``x``'s promoted with ``param_dtype``)."""
    return jnp.dtype(self.dtype or jnp.result_type(x.dtype, self.param_dtype))

  def add_bias(self, y: jax.Array) -> jax.Array:
    return y + self.bias[...].astype(y.dtype) if self.use_bias else y


def fp8_group(layers, x: jax.Array) -> tuple[jnp.dtype, str, tuple] | None:
  """``(dtype, fp8_backward, ((codes, scale), ...))`` for fp8 layers computed together on ``x``, or None.

  None unless every layer is an unstacked fp8 ``QuantizedLinear`` (with
  ``shared_input`` when there are several), all computing in one dtype with
  one ``fp8_backward``.
  """
  if not all(isinstance(l, QuantizedLinear) and l.spec.format == "fp8" and not l.stack_shape for l in layers):
    return None
  if len(layers) > 1 and not all(l.shared_input for l in layers):
    return None
  dtypes = {l.compute_dtype(x) for l in layers}
  backwards = {l.fp8_backward for l in layers}
  if len(dtypes) != 1 or len(backwards) != 1:
    return None
  return dtypes.pop(), backwards.pop(), tuple((l.qkernel[...], l.kernel_scale[...]) for l in layers)


def fp8_projections(layers, x: jax.Array) -> tuple[jax.Array, ...] | None:
  """Base outputs of sibling fp8 layers on one input ``x``, one cast and GEMM for all (see ``fp8_group``)."""
  group = fp8_group(layers, x) if len(layers) > 1 else None
  if group is None:
    return None
  dtype, backward, kernels = group
  ys = fp8_matmuls(x.astype(dtype), kernels, dtype, backward)
  return tuple(l.add_bias(y) for l, y in zip(layers, ys))


def set_fp8_matmul(model: nnx.Module, *, shared_input: bool = True, backward: str = "fp8",
                   fused_lora: bool = True) -> nnx.Module:
  """Choose how the model's fp8 ``QuantizedLinear`` layers compute (before jitting); returns the model.

  Args:
    shared_input: cast an input to fp8 once for all sibling layers reading it
      (q/k/v, gate/up) and run one GEMM per direction for them (default);
      False casts it for each layer.
    backward: ``"fp8"`` (default; the input gradient cast to e5m2, an fp8
      GEMM) or ``"upcast"`` (the e4m3 kernel converted to the compute dtype:
      a slower GEMM, no rounding of the gradient).
    fused_lora: compute LoRA adapters over fp8 layers inside the fp8
      matmul's custom backward (one ``x @ [A_q|A_k|A_v]``, one ``dA``, one
      ``dx`` for a group; default), or under plain autodiff (False). Same
      math; dropout, per-sample routing and DoRA always take the plain path.
  """
  check_backward(backward)
  for _, layer in nnx.iter_graph(model):
    if isinstance(layer, QuantizedLinear):
      layer.shared_input = bool(shared_input)
      layer.fp8_backward = backward
      layer.fused_lora = bool(fused_lora)
  return model
