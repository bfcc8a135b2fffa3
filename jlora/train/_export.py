"""Write the trained adapter, then prove it: reload it into the base model and merge it.

The adapter is a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``, ``jlora.io.save_peft``). Both checks compare
logits on one held-out row with the trained model: the base model with the
adapter reloaded from disk, and that model with the adapter merged in.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.io import load_peft, save_peft, save_pretrained
from jlora.nn import set_adapter, unload
from jlora.quant import merge_and_unload  # dequantizes a quantized base first


def _logits(model, ids) -> np.ndarray:
  return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.ones_like(jnp.asarray(ids))))


def export_adapter(model: nnx.Module, out: Path, probe_ids, save_merged: bool):
  """``(adapter_dir, merged_dir or None, checks)``; ``checks`` maps check name -> max |Δlogit|.

  ``probe_ids`` ``[1, T]`` (or None: no checks) is the row the logits are compared on.
  """
  adapter_dir = out / "adapter"
  save_peft(model, str(adapter_dir))
  checks: dict[str, float] = {}
  merged_dir = None
  if probe_ids is None and not save_merged:
    return adapter_dir, None, checks
  model.eval()
  reloaded = load_peft(unload(nnx.clone(model)), str(adapter_dir))  # base model + the saved adapter
  reloaded.eval()
  if probe_ids is not None:
    want = _logits(model, probe_ids)
    checks["reload_max_abs_diff"] = float(np.max(np.abs(_logits(reloaded, probe_ids) - want)))
  merged = merge_and_unload(reloaded)
  if probe_ids is not None:
    checks["merge_max_abs_diff"] = float(np.max(np.abs(_logits(merged, probe_ids) - want)))
  if save_merged:
    merged_dir = out / "merged"
    save_pretrained(merged, str(merged_dir))
  model.train()
  return adapter_dir, merged_dir, checks


def export_adapters(model: nnx.Module, out: Path, names, probe_ids):
  """``(adapter_dirs, checks)`` for jointly trained adapters: ``adapters/<name>`` for each of ``names``.

  The check reloads every directory into the base model, activates them all and compares logits on
  ``probe_ids`` (``reload_max_abs_diff``) with the trained model.
  """
  dirs = {name: out / "adapters" / name for name in names}
  for name, path in dirs.items():
    save_peft(model, str(path), adapter_name=name)
  checks: dict[str, float] = {}
  if probe_ids is None:
    return dirs, checks
  model.eval()
  reloaded = unload(nnx.clone(model))
  for name, path in dirs.items():
    load_peft(reloaded, str(path), adapter_name=name)
  set_adapter(reloaded, list(names))
  reloaded.eval()
  checks["reload_max_abs_diff"] = float(np.max(np.abs(_logits(reloaded, probe_ids) - _logits(model, probe_ids))))
  model.train()
  return dirs, checks
