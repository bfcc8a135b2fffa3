"""PyTorch + PEFT as the oracle: tiny torch twins of tiny NNX models, and layout converters.

Only tests import this module (jlora itself never imports torch). Layouts:

- ``nn.Linear`` weight ``[out, in]`` ↔ ``nnx.Linear`` kernel ``[in, out]``; LoRA
  ``lora_A.weight [r, in]`` / ``lora_B.weight [out, r]`` ↔ jlora A ``[in, r]`` / B ``[r, out]``.
- ``nn.Embedding`` weight ``[num, dim]`` = ``nnx.Embed`` embedding; LoRA
  ``lora_embedding_A [r, num]`` / ``lora_embedding_B [dim, r]`` ↔ A ``[num, r]`` / B ``[r, dim]``.
- ``nn.Conv2d`` weight ``[out, in, kh, kw]`` ↔ ``nnx.Conv`` kernel ``[kh, kw, in, out]``; LoRA
  ``lora_A.weight [r, in, kh, kw]`` ↔ A ``[kh, kw, in, r]``, ``lora_B.weight [out, r, 1, 1]`` ↔ B ``[r, out]``.
  Images are NCHW in torch and NHWC in Flax.
"""

from __future__ import annotations

import numpy as np
import peft
import torch
from flax import nnx
from torch import nn

import jlora

IN, OUT, VOCAB, DIM, CHANNELS, FEATURES = 6, 5, 11, 4, 3, 4


class TorchTiny(nn.Module):
  """One Linear, one Embedding and one strided Conv2d; PEFT wraps them by name."""

  def __init__(self, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)
    self.lin = nn.Linear(IN, OUT)
    self.emb = nn.Embedding(VOCAB, DIM)
    self.conv = nn.Conv2d(CHANNELS, FEATURES, 3, stride=2, padding=1)


class NnxTiny(nnx.Module):
  """The NNX twin of ``TorchTiny`` (same names, Flax layouts); ``from_torch`` copies its weights."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.lin = nnx.Linear(IN, OUT, rngs=rngs)
    self.emb = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.conv = nnx.Conv(CHANNELS, FEATURES, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                         rngs=rngs)

  @classmethod
  def from_torch(cls, torch_model: TorchTiny) -> "NnxTiny":
    model = cls()
    model.lin.kernel[...] = to_np(torch_model.lin.weight).T
    model.lin.bias[...] = to_np(torch_model.lin.bias)
    model.emb.embedding[...] = to_np(torch_model.emb.weight)
    model.conv.kernel[...] = to_np(torch_model.conv.weight).transpose(2, 3, 1, 0)
    model.conv.bias[...] = to_np(torch_model.conv.bias)
    return model


def twins(adapters: dict[str, dict], active=None, seed: int = 0):
  """``(peft LoraModel, jlora model)``: same base weights, adapters ``name -> LoraConfig kwargs``.

  PEFT's factors are randomised (B nonzero) and copied into jlora; ``active``
  (default: the first adapter) is set active in both.
  """
  (first, first_kwargs), *rest = adapters.items()
  torch_model = TorchTiny(seed)
  model = NnxTiny.from_torch(torch_model)
  pm = peft_model(torch_model, first, init_lora_weights=False, **first_kwargs)
  jlora.get_peft_model(model, jlora.LoraConfig(**first_kwargs), first)
  for name, kwargs in rest:
    pm.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **kwargs))
    jlora.add_adapter(model, name, jlora.LoraConfig(**kwargs))
  root = pm.base_model  # forwards attribute and submodule lookups ("lin") to the torch model
  randomize_peft(root, seed)
  for name in adapters:
    copy_factors(root, model, name)
  active = active or [first]
  root.set_adapter(active)
  jlora.set_adapter(model, active)
  return root, model


def to_np(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy()


def peft_model(torch_model: nn.Module, adapter_name: str = "default", **lora_kwargs) -> peft.PeftModel:
  """``peft.get_peft_model`` with a ``peft.LoraConfig(**lora_kwargs)``."""
  return peft.get_peft_model(torch_model, peft.LoraConfig(**lora_kwargs), adapter_name=adapter_name)


def randomize_peft(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
  """Every LoRA factor in ``model`` ← N(0, scale²), so B is nonzero and adapters matter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name:
        param.copy_(scale * torch.randn(param.shape, generator=gen))


def flax_factors(peft_layer: nn.Module, adapter: str) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's (A, B) of ``adapter`` in one wrapped layer, in jlora's (Flax) layout."""
  if adapter in peft_layer.lora_embedding_A:
    return (to_np(peft_layer.lora_embedding_A[adapter]).T,
            to_np(peft_layer.lora_embedding_B[adapter]).T)
  a, b = to_np(peft_layer.lora_A[adapter].weight), to_np(peft_layer.lora_B[adapter].weight)
  if a.ndim == 4:  # Conv2d
    return a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T
  return a.T, b.T


def copy_factors(peft_root: nn.Module, jlora_root: nnx.Module, adapter: str) -> None:
  """Set adapter ``adapter`` of every jlora layer to PEFT's factors for the same module name."""
  for _, layer in jlora.lora_layers(jlora_root):
    if adapter not in layer.adapters:
      continue
    (name,) = layer.module_names
    a, b = flax_factors(peft_root.get_submodule(name), adapter)
    layer.adapters[adapter].lora_A[...] = a
    layer.adapters[adapter].lora_B[...] = b


def peft_delta_in_flax_layout(peft_layer: nn.Module, adapter: str) -> np.ndarray:
  """PEFT's ``get_delta_weight`` rearranged into the Flax kernel's layout."""
  delta = to_np(peft_layer.get_delta_weight(adapter))
  if delta.ndim == 4:
    return delta.transpose(2, 3, 1, 0)
  if adapter in peft_layer.lora_embedding_A:
    return delta  # [num, dim] already
  return delta.T


def torch_inputs(seed: int = 0):
  """``(x [2, IN], ids [2, 3], images [2, C, 7, 7])`` in torch form."""
  gen = torch.Generator().manual_seed(seed)
  return (torch.randn(2, IN, generator=gen), torch.randint(0, VOCAB, (2, 3), generator=gen),
          torch.randn(2, CHANNELS, 7, 7, generator=gen))


def torch_squared_loss(torch_root: nn.Module, modules) -> torch.Tensor:
  """Sum over ``modules`` ("lin" / "emb" / "conv") of the mean squared output on ``torch_inputs()``."""
  x, ids, imgs = torch_inputs()
  return sum((torch_root.get_submodule(m)(i) ** 2).mean() for m, i in zip(modules, (x, ids, imgs)))


def jax_squared_loss(jlora_root: nnx.Module, modules):
  """``torch_squared_loss`` of the jlora twin, on the same inputs in the Flax layout."""
  x, ids, imgs = (to_np(t) for t in torch_inputs())
  inputs = (x, ids, imgs.transpose(0, 2, 3, 1))
  return sum((getattr(jlora_root, m)(i) ** 2).mean() for m, i in zip(modules, inputs))


def outputs(torch_root: nn.Module, jlora_root: nnx.Module, module: str, seed: int = 0):
  """``(torch_out, jlora_out)`` of module ``module`` ("lin" / "emb" / "conv") on the same input,
  both as NumPy arrays in the Flax layout."""
  x, ids, imgs = torch_inputs(seed)
  torch_in = {"lin": x, "emb": ids, "conv": imgs}[module]
  with torch.no_grad():
    expected = to_np(torch_root.get_submodule(module)(torch_in))
  if module == "conv":
    expected = expected.transpose(0, 2, 3, 1)
    jax_in = to_np(imgs).transpose(0, 2, 3, 1)
  else:
    jax_in = to_np(torch_in)
  return expected, np.asarray(getattr(jlora_root, module)(jax_in))
