"""Model-facing switches for the fused LoRA matmul, and shared-input fusion of sibling projections.

A model whose projections read the same input (attention's q/k/v, an MLP's
gate/up) calls ``lora_projections((q_proj, k_proj, v_proj), h)`` instead of
calling each layer: with LoRA on them, the adapters' ``x @ A`` become one
matmul over ``[A_q | A_k | A_v]`` and, merged on the fly, the kernels one
matmul over ``[W'_q | W'_k | W'_v]``. The fusion happens at call time only;
parameters, PEFT names and checkpoints stay per projection.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from jlora.nn._builtin_layers import LoraLinear, linear_parts, zero_rank
from jlora.nn._fused import check_matmul_mode, lora_matmul
from jlora.nn._inject import lora_layers
from jlora.nn._layer import LoraLayer


def set_lora_matmul(model: nnx.Module, mode: str = "auto", *, shared_input: bool = True) -> None:
  """Choose how every ``LoraLinear`` of ``model`` computes (before jitting its forward pass).

  Layers start with ``"plain"``; ``"auto"`` is the fast setting for training
  and long prompts, ``"exact"`` the fused form that rounds least
  (``jlora.nn.lora_matmul``).

  Args:
    mode: ``"exact"`` (``[x | x·A]·[W ; B]`` as one matmul above a token
      threshold, low-rank backward), ``"auto"`` (merge ``W + A·B`` on the fly
      above the threshold: rounds the update into W's dtype), ``"fused"``
      (always merge on the fly) or ``"plain"`` (``x@W + s·(x@A)@B`` under
      plain autodiff).
    shared_input: let ``lora_projections`` fuse sibling projections of one input.
  """
  check_matmul_mode(mode)
  for _, layer in lora_layers(model):
    if isinstance(layer, LoraLinear):
      layer.matmul_mode = mode
      layer.shared_input = bool(shared_input)


def _parts(layer, x):
  if isinstance(layer, LoraLinear):
    return layer.fused_parts(x)
  if type(layer) is nnx.Linear:
    parts = linear_parts(layer, x)
    return None if parts is None else parts[:3] + (zero_rank(parts[1]),) + parts[3:]
  return None


def lora_projections(layers: Sequence[nnx.Module], x: jax.Array) -> tuple[jax.Array, ...]:
  """``tuple(layer(x) for layer in layers)``, fused into one ``lora_matmul`` when possible.

  Fusion needs at least one ``LoraLinear`` among ``layers``, all of them with
  ``shared_input`` and one ``matmul_mode`` other than ``"plain"``, and every
  layer an ``nnx.Linear`` or ``LoraLinear`` that can take the fused path;
  otherwise each layer is called on its own. A LoRA layer type among
  ``layers`` may compute them together its own way first
  (``LoraLayer.shared_projections``). Outputs equal the separate calls up to
  floating-point rounding.
  """
  for kind in dict.fromkeys(type(layer) for layer in layers if isinstance(layer, LoraLayer)):
    shared = kind.shared_projections(layers, x)
    if shared is not None:
      return shared
  loras = [layer for layer in layers if isinstance(layer, LoraLinear)]
  modes = {layer.matmul_mode for layer in loras}
  if (not loras or len(modes) != 1 or "plain" in modes
      or not all(layer.shared_input for layer in loras)):
    return tuple(layer(x) for layer in layers)
  parts = [_parts(layer, x) for layer in layers]
  if any(p is None for p in parts) or len({(p[0].dtype, p[4]) for p in parts}) != 1:
    return tuple(layer(x) for layer in layers)
  precisions = {getattr(layer, "base_layer", layer).precision for layer in layers}
  if len(precisions) != 1:
    return tuple(layer(x) for layer in layers)
  ys = lora_matmul(parts[0][0], [p[1] for p in parts], [p[3] for p in parts], mode=modes.pop(),
                   dtype=parts[0][4], precision=precisions.pop())
  return tuple(y if p[2] is None else y + p[2] for y, p in zip(ys, parts))
