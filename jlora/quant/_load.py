"""Quantize while loading: each kernel is quantized as soon as its tensor is read.

A checkpoint loader builds the model abstractly (``nnx.eval_shape``), asks
``LoadQuantizer.take(path, value)`` for every tensor it reads, and calls
``finish(model)`` once the rest is in place. Kernels the quantizer takes never
become full-precision device arrays, so peak memory is the quantized model
plus the one tensor being converted.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nn import candidates
from jlora.quant import _formats
from jlora.quant._linear import QuantizedLinear
from jlora.quant._model import _install, plan


class LoadQuantizer:
  """Per-tensor quantization hook for a loader (see the module doc).

  Args:
    abstract_model: the model as ``nnx.eval_shape`` builds it; the layers to
      quantize are chosen and validated here, before any tensor is read.
    format, block_size, double_quant, targets: as ``jlora.quantize``.
  """

  def __init__(self, abstract_model: nnx.Module, format: str, *, block_size: int = 64,
               double_quant: bool | None = None, targets: str | Sequence[str] | None = None):
    chosen = plan(abstract_model, format, block_size=block_size, double_quant=double_quant, targets=targets)
    self._specs = {tuple(cand.path) + ("kernel",): spec for cand, spec in chosen}
    self._arrays: dict[tuple, dict] = {}

  def take(self, path: tuple, value: np.ndarray) -> bool:
    """Quantize ``value`` (a kernel ``[*stack, in, out]``) if ``path`` is one to quantize."""
    spec = self._specs.get(tuple(path))
    if spec is None:
      return False
    self._arrays[tuple(path)] = _formats.quantize(jnp.asarray(value), spec)
    return True

  def finish(self, model: nnx.Module) -> nnx.Module:
    """Swap the quantized layers in; their (abstract) full-precision kernels are dropped."""
    for cand in list(candidates(model)):
      key = tuple(cand.path) + ("kernel",)
      if key in self._arrays:
        linear = cand.base
        layer = QuantizedLinear(self._specs[key], self._arrays.pop(key),
                                bias=linear.bias if linear.use_bias else None,
                                dtype=linear.dtype, param_dtype=linear.param_dtype)
        _install(model, cand, layer)
    return model
