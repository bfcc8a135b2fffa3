"""``save_peft``: one jlora adapter as a PEFT adapter directory, in its kind's declared format.

A kind whose format ``saves_lora_factors`` exports as plain PEFT LoRA with
the same outputs: MoSLoRA with its mixer folded into the factors, WLoRA by
PEFT's ``cat`` construction (rank = sum of the upstream ranks, ``lora_alpha
= r``), both exact, DoRA with its magnitudes. Other kinds write their own
tensors (``PeftFormat.tensors``), each converted by its parameter's role.
The config comes from the kind (``PeftFormat.config_to_peft``); LoRA's names
each adapted module explicitly (``target_modules`` lists full module names,
``rank_pattern`` / ``alpha_pattern`` give the modules whose rank or scaling
differ from the default), so PEFT rebuilds exactly these modules whatever
targeting rules produced them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jlora.io import _peft_layout as layout
from jlora.io import _safetensors
from jlora.io._files import check_directory_path, fresh_dir, writing
from jlora.io._hf import source_of
from jlora.io._peft_config import CONFIG_NAME
from jlora.io._peft_load import WEIGHTS_NAME, peft_format, read_adapter
from jlora.nn import LoraConfig, LoraLayer, kind_for_config, kind_of, lora_layers, module_copies, peft_config
from jlora.models import family_of


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _flat(x: np.ndarray, stack: tuple) -> np.ndarray:
  return x.reshape((max(1, math.prod(stack)),) + x.shape[len(stack):])


def layer_factors(layer: LoraLayer, adapter) -> list[tuple[str, np.ndarray, np.ndarray, float] | None]:
  """Per stacked layer: ``(module name, A [.., r_i], B [r_i, ..], scaling)``, None where the
  adapter leaves that layer out: its exact plain-LoRA factors (``export_factors``)."""
  stack = layer.stack_shape
  size = max(1, math.prod(stack))
  a, b, scaling = (_flat(_np(x), stack) for x in adapter.export_factors(layer))
  b = np.moveaxis(b, 1 + layer.b_rank_axis, 1)
  ranks = adapter.live_ranks()
  out = []
  for i, module in enumerate(layer.module_names):
    r = int(ranks[i])
    out.append((module, a[i][..., :r], b[i][:r], float(scaling.reshape(size)[i])) if r else None)
  return out


def save_peft(model: nnx.Module, out_dir: str | os.PathLike, adapter_name: str = "default",
              initial_adapter: str | os.PathLike | None = None, *,
              base_model_name_or_path: str | None = None) -> Path:
  """Write adapter ``adapter_name`` as ``adapter_config.json`` + ``adapter_model.safetensors``.

  ``PeftModel.from_pretrained(hf_model, out_dir)`` then gives the same
  outputs as the jlora model with this adapter active. The directory is
  written to a temporary sibling and renamed into place, so a crash never
  leaves a half-written adapter; an existing directory is replaced only if it
  is empty or already a PEFT adapter.

  Args:
    initial_adapter: for a PiSSA / OLoRA adapter, its factors at
      initialisation: a PEFT adapter directory saved right after
      ``get_peft_model`` (``save_peft`` or PEFT's ``save_pretrained``), or the
      name of an adapter of ``model`` holding them. The adapter is then saved
      as plain LoRA for the *original* base model, as PEFT's
      ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does:
      ``A' = [A | A0]``, ``B' = [B | -B0]`` (rank and alpha doubled), since
      ``W_res + s·A·B = W + s·(A·B - A0·B0)``.
    base_model_name_or_path: the base checkpoint's directory or hub name, written to the config so
      ``peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)`` finds it; default: the directory
      ``jlora.from_pretrained`` loaded ``model`` from (None for a model built otherwise).
      ``task_type`` is ``CAUSAL_LM`` for a language model of a registered family.

  Returns:
    The output directory.
  """
  configs = peft_config(model)
  if adapter_name not in configs:
    raise ValueError(f"The model has no adapter {adapter_name!r} (it has {list(configs) or 'none'}); "
                     "pass one of those names.")
  out = Path(out_dir).expanduser()
  _check_target(out)
  config = configs[adapter_name]
  tensors, modules = _peft_tensors(model, adapter_name)
  if initial_adapter is not None:
    config, tensors, modules = _to_plain_lora(model, config, tensors, modules, initial_adapter)
  fmt = peft_format(kind_for_config(config))
  peft = fmt.config_to_peft(config, list(modules), modules, _fan_in_fan_out(model, config))
  peft.update(_identity(model, base_model_name_or_path))
  _write_dir(out, tensors, peft)
  return out


def _peft_tensors(model: nnx.Module, adapter_name: str) -> tuple[dict, dict]:
  """``(PEFT key -> tensor, module -> (rank, scaling))`` of one adapter, as its kind declares."""
  tensors, modules, shared = {}, {}, {}
  for _, wrapper in module_copies(model):
    if adapter_name in wrapper.adapters:
      tensors.update(layout.module_tensors(wrapper.adapters[adapter_name].module, wrapper.module_names[0]))
  for _, layer in lora_layers(model):
    if adapter_name not in layer.adapters:
      continue
    adapter = layer.adapters[adapter_name]
    kind = kind_of(adapter)
    fmt = peft_format(kind)
    lkind = layout.layout_of(layer)
    window = len(layer.base_layer.kernel_size) if lkind == "conv" else 0
    live = {}
    if fmt.saves_lora_factors:
      own = {a: n for a, n in fmt.tensors.items() if kind.roles.get(a) not in ("A", "B", "mixer")}
      for i, entry in enumerate(layer_factors(layer, adapter)):
        if entry is None:
          continue
        module, a, b, scaling = entry
        key_a, key_b = layout.factor_keys(lkind, module)
        tensors[key_a] = layout.a_to_peft(lkind, a)
        tensors[key_b] = layout.b_to_peft(lkind, b, window)
        modules[module] = (a.shape[-1], scaling)
        live[i] = module
    else:
      own = dict(fmt.tensors)
      for i, (module, rank) in enumerate(zip(layer.module_names, adapter.live_ranks())):
        if rank:
          modules[module] = (int(rank), 1.0)
          live[i] = module
    for attr, name in own.items():
      role = kind.roles[attr]
      values = _flat(_np(getattr(adapter, attr)[...]), layer.stack_shape)
      for i, module in live.items():
        key = layout.tensor_key(lkind, role, name, module)
        tensors[key] = layout.to_peft(lkind, role, values[i], modules[module][0], window)
    if fmt.shared_to_peft is not None:
      shared.setdefault(id(fmt), (fmt, []))[1].append((layer, adapter))
  if not modules:
    raise ValueError(f"Adapter {adapter_name!r} adapts no layer; nothing to save.")
  for fmt, pairs in shared.values():
    tensors.update(fmt.shared_to_peft(pairs, peft_config(model)[adapter_name]))
  return tensors, modules


def _to_plain_lora(model, config, tensors: dict, modules: dict, initial) -> tuple:
  """PEFT's ``subtract_mutated_init``: the PiSSA/OLoRA adapter as LoRA on the original base."""
  if not isinstance(config, LoraConfig):
    raise ValueError("initial_adapter converts PiSSA / OLoRA LoRA adapters; this adapter is "
                     f"{type(config).__name__}. Save it without initial_adapter.")
  if isinstance(initial, str) and initial in peft_config(model):
    initial_tensors, _ = _peft_tensors(model, initial)
    where = f"adapter {initial!r}"
  else:
    path = Path(initial).expanduser()
    initial_tensors = read_adapter(path)[1]
    where = str(path)
  if set(initial_tensors) != set(tensors):
    odd = sorted(set(initial_tensors) ^ set(tensors))
    raise ValueError(
        f"initial_adapter {where} does not hold the same modules as the adapter being saved (e.g. "
        f"{', '.join(odd[:3])}); pass the initial state of this very adapter.")
  converted = {}
  for key, value in tensors.items():
    start = initial_tensors[key]
    if start.shape != value.shape:
      raise ValueError(f"initial_adapter {where}: tensor {key!r} has shape {start.shape}, the adapter "
                       f"has {value.shape}; pass the initial state of this very adapter.")
    if not key.endswith((".lora_A.weight", ".lora_embedding_A", ".lora_B.weight", ".lora_embedding_B")):
      converted[key] = value  # DoRA magnitudes, modules_to_save copies: unchanged
      continue
    if key.endswith(".lora_magnitude_vector"):  # DoRA: W_res + s·A·B = W + s·(A·B - A0·B0), same norm
      converted[key] = value
      continue
    is_a = key.endswith((".lora_A.weight", ".lora_embedding_A"))
    converted[key] = (np.concatenate([value, start], axis=0) if is_a
                      else np.concatenate([value, -start.astype(value.dtype)], axis=1))
  modules = {m: (2 * rank, scaling) for m, (rank, scaling) in modules.items()}
  factor = math.sqrt(2) if config.use_rslora else 2
  plain = LoraConfig(r=2 * config.r, lora_alpha=config.lora_alpha * factor,
                     use_rslora=config.use_rslora, use_dora=config.use_dora,
                     modules_to_save=config.modules_to_save,
                     target_modules=config.target_modules)
  return plain, converted, modules


def _identity(model: nnx.Module, base_model_name_or_path: str | None) -> dict:
  """``task_type`` and ``base_model_name_or_path``, which PEFT's ``AutoPeftModel*`` classes need."""
  if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, (str, os.PathLike)):
    raise TypeError(f"save_peft: base_model_name_or_path must be a path or a hub name, got "
                    f"{type(base_model_name_or_path).__name__}.")
  source = base_model_name_or_path if base_model_name_or_path is not None else source_of(model)
  return {"task_type": "CAUSAL_LM" if family_of(model) is not None else None,
          "base_model_name_or_path": None if source is None else os.fspath(source)}


def _fan_in_fan_out(model: nnx.Module, config) -> bool:
  return getattr(family_of(model), "fan_in_fan_out", False) or bool(getattr(config, "fan_in_fan_out", False))


def _check_target(out: Path) -> None:
  check_directory_path(out, "save_peft's out_dir")
  if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
    raise ValueError(
        f"{out} is a non-empty directory without {CONFIG_NAME}, i.e. not a PEFT adapter; refusing "
        "to overwrite it. Choose a new or empty directory."
    )


def _write_dir(out: Path, tensors: dict, config: dict) -> None:
  with writing(out, "the adapter"):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(out.parent, f".{out.name}.", ".tmp")
    old = None
    try:
      _safetensors.write(tensors, tmp / WEIGHTS_NAME)
      _safetensors.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", tmp / CONFIG_NAME)
      if out.exists():
        old = fresh_dir(out.parent, f".{out.name}.", ".old")
        os.replace(out, old / "adapter")
        try:
          os.replace(tmp, out)
        except BaseException:
          os.replace(old / "adapter", out)  # put the previous adapter back
          raise
      else:
        os.replace(tmp, out)
    finally:
      for leftover in (tmp, old):
        if leftover is not None and leftover.exists():
          shutil.rmtree(leftover, ignore_errors=True)
