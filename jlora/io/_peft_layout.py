"""PEFT's tensor names and layouts for each jlora layer type.

PEFT (torch) stores LoRA factors rank-first, jlora (Flax) rank-last for A:

=========  =====================================  ==============================
layer      PEFT key: shape                        jlora factor
=========  =====================================  ==============================
Linear     ``lora_A.weight``: ``[r, in]``         A ``[in, r]`` (transpose)
           ``lora_B.weight``: ``[out, r]``        B ``[r, out]`` (transpose)
Embed      ``lora_embedding_A``: ``[r, num]``     A ``[num, r]`` (transpose)
           ``lora_embedding_B``: ``[dim, r]``     B ``[r, dim]`` (transpose)
Conv       ``lora_A.weight``: ``[r, in, *win]``   A ``[*win, in, r]``
           ``lora_B.weight``: ``[out, r, 1..]``   B ``[r, out]``
MoSLoRA    ``lora_AB.weight``: ``[r, r]``         mixer M = W.T (``h @ M``)
DoRA       ``lora_magnitude_vector``: ``[out]``   magnitude ``[out]``
           (Conv: ``[1, out, 1, ..]``)
=========  =====================================  ==============================

GPT-2's ``Conv1D`` (``fan_in_fan_out=True``) needs nothing special: PEFT's
LoRA factors there are plain ``nn.Linear`` weights, laid out as above.

Any kind's parameter converts by its role (``jlora.nn.ROLES``): ``A`` / ``B``
/ ``mixer`` / ``magnitude`` as in the table, every other role as it is.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jlora.nn import LoraConv, LoraEmbed, LoraLayer, LoraLinear

PREFIX = "base_model.model."
MIXER = "lora_AB.weight"


def layout_of(layer: LoraLayer) -> str:
  """``"linear"`` / ``"embed"`` / ``"conv"``; raises for layer types PEFT has no layout for."""
  if isinstance(layer, LoraEmbed):
    return "embed"
  if isinstance(layer, LoraConv):
    return "conv"
  if isinstance(layer, LoraLinear):
    return "linear"
  raise ValueError(
      f"{layer.module_names[0]} is a {type(layer).__name__}, which has no PEFT checkpoint layout "
      "(PEFT stores LoRA for Linear, Embedding and Conv layers only); keep this adapter in "
      "jlora's own format (jlora.adapter_state) or target only Linear/Embed/Conv layers."
  )


def factor_keys(kind: str, module_name: str) -> tuple[str, str]:
  """The PEFT keys of (A, B) for one module."""
  if kind == "embed":
    return f"{PREFIX}{module_name}.lora_embedding_A", f"{PREFIX}{module_name}.lora_embedding_B"
  return f"{PREFIX}{module_name}.lora_A.weight", f"{PREFIX}{module_name}.lora_B.weight"


def tensor_key(kind: str, role: str, name: str | None, module_name: str) -> str:
  """The PEFT key of a parameter of ``role`` saved as ``name`` (None: the role's own LoRA name)."""
  if name is None:
    if role not in ("A", "B"):
      raise ValueError(f"A {role!r} parameter needs an explicit PEFT tensor name in its kind's PeftFormat.")
    return factor_keys(kind, module_name)[role == "B"]
  return f"{PREFIX}{module_name}.{name}"


def to_peft(kind: str, role: str, value: np.ndarray, rank: int, window_ndim: int = 0) -> np.ndarray:
  """One stacked layer's jlora parameter of ``role`` (live ``rank``) in PEFT's layout."""
  if role == "A":
    return a_to_peft(kind, value[..., :rank])
  if role == "B":
    return b_to_peft(kind, value[:rank], window_ndim)
  if role == "mixer":
    return np.ascontiguousarray(value[:rank, :rank].T)
  if role == "magnitude":
    return magnitude_to_peft(kind, value, window_ndim)
  return np.ascontiguousarray(value)


def from_peft(kind: str, role: str, w: np.ndarray) -> np.ndarray:
  """The inverse of ``to_peft`` (the live part; the caller pads it into the slot)."""
  if role == "A":
    return a_from_peft(kind, w)
  if role == "B":
    return b_from_peft(kind, w)
  if role == "mixer":
    return w.T  # lora_AB(h) = h @ W.T, i.e. M = W.T
  if role == "magnitude":
    return w.reshape(-1)
  return w


def mixer_key(module_name: str) -> str:
  return f"{PREFIX}{module_name}.{MIXER}"


def module_tensors(module: nnx.Module, name: str) -> dict[str, np.ndarray]:
  """A ``modules_to_save`` copy as PEFT saves it: ``{PREFIX}{name}.weight`` (torch layout), ``.bias``."""
  if isinstance(module, nnx.Embed):
    weight = np.asarray(module.embedding[...])
  elif isinstance(module, (nnx.Linear, nnx.Conv)):
    kernel = np.asarray(module.kernel[...])
    weight = kernel.T if kernel.ndim == 2 else np.moveaxis(kernel, (-1, -2), (0, 1))
  else:
    raise ValueError(
        f"modules_to_save copy {name} is a {type(module).__name__}, which has no PEFT layout here "
        "(Linear, Embed and Conv do); keep it in jlora's format (jlora.adapter_state).")
  out = {f"{PREFIX}{name}.weight": np.ascontiguousarray(weight)}
  if getattr(module, "bias", None) is not None:
    out[f"{PREFIX}{name}.bias"] = np.asarray(module.bias[...])
  return out


def module_variables(module: nnx.Module, name: str) -> dict[str, tuple[nnx.Variable, callable]]:
  """PEFT key -> (the copy's variable, PEFT tensor -> its value) for a ``modules_to_save`` copy."""
  if isinstance(module, nnx.Embed):
    out = {f"{PREFIX}{name}.weight": (module.embedding, lambda w: w)}
  else:
    to_kernel = lambda w: w.T if w.ndim == 2 else np.moveaxis(w, (0, 1), (-1, -2))
    out = {f"{PREFIX}{name}.weight": (module.kernel, to_kernel)}
  if getattr(module, "bias", None) is not None:
    out[f"{PREFIX}{name}.bias"] = (module.bias, lambda b: b)
  return out


def magnitude_key(module_name: str) -> str:
  return f"{PREFIX}{module_name}.lora_magnitude_vector"


def magnitude_to_peft(kind: str, m: np.ndarray, window_ndim: int = 0) -> np.ndarray:
  """jlora DoRA magnitude ``[out]`` -> PEFT's (Conv: ``[1, out, 1, ...]``)."""
  if kind == "conv":
    return np.ascontiguousarray(m.reshape((1, -1) + (1,) * window_ndim))
  return np.ascontiguousarray(m)


def a_from_peft(kind: str, w: np.ndarray) -> np.ndarray:
  """PEFT A -> jlora A (rank last)."""
  if kind == "conv":
    return np.moveaxis(w, (0, 1), (-1, -2))  # [r, in, *win] -> [*win, in, r]
  return w.T


def b_from_peft(kind: str, w: np.ndarray) -> np.ndarray:
  """PEFT B -> jlora B ``[r, out]``."""
  if kind == "conv":
    if any(d != 1 for d in w.shape[2:]):
      raise ValueError(f"PEFT conv lora_B must be a 1x1 kernel, got shape {w.shape}.")
    w = w.reshape(w.shape[:2])
  return w.T


def a_to_peft(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.ascontiguousarray(np.moveaxis(a, (-1, -2), (0, 1)))
  return np.ascontiguousarray(a.T)


def b_to_peft(kind: str, b: np.ndarray, window_ndim: int = 0) -> np.ndarray:
  """jlora B ``[r, out]`` -> PEFT B (``[out, r]``, conv ``[out, r, 1, ...]``)."""
  if kind == "conv":
    return np.ascontiguousarray(b.T.reshape(b.shape[1], b.shape[0], *([1] * window_ndim)))
  return np.ascontiguousarray(b.T)


def peft_shapes(kind: str, a_shape: tuple, b_shape: tuple) -> tuple[tuple, tuple]:
  """PEFT (A, B) shapes for jlora factor shapes of one layer (for error messages)."""
  a = np.empty(a_shape, np.int8)
  b = np.empty(b_shape, np.int8)
  if kind == "conv":
    return a_to_peft(kind, a).shape, b_to_peft(kind, b, len(a_shape) - 2).shape
  return a_to_peft(kind, a).shape, b_to_peft(kind, b).shape
