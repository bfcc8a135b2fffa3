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

# The keyword options of ``jlora.quantize`` a loader passes on.
OPTIONS = ("block_size", "double_quant", "targets")


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

  @classmethod
  def for_options(cls, abstract_model: nnx.Module, format: str | None,
                  options: dict | None) -> LoadQuantizer | None:
    """The quantizer for a loader's ``quantize`` / ``quantize_options`` (None: no quantization).

    Unknown option names, and options without a format, are refused here, before any tensor is read.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
      raise ValueError(f"Unknown quantize_options {unknown}; the options are "
                       f"{', '.join(map(repr, OPTIONS))} (as for jlora.quantize).")
    if format is None:
      if options:
        raise ValueError(f"quantize_options need quantize=<format> ({', '.join(map(repr, _formats.FORMATS))}); "
                         f"got quantize=None with {options}.")
      return None
    return cls(abstract_model, format, **options)

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
