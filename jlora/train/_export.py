"""Write the trained adapter, then prove it: reload it into the base model and merge it.

With ``jlora.save_peft`` / ``jlora.load_peft`` (``jlora.io``) the adapter is a
PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``).
Without ``jlora.io`` the adapter state is written as one safetensors file of
flat ``path -> array`` entries (reloaded with ``load_adapter_state``).
Both checks compare logits on one held-out row with the trained model.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora


def _logits(model, ids) -> np.ndarray:
  return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.ones_like(jnp.asarray(ids))))


def _save_state_safetensors(model, directory: Path) -> None:
  from safetensors.numpy import save_file

  flat = {".".join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(jlora.adapter_state(model))}
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / "adapter_state.safetensors.tmp"
  save_file(flat, str(tmp))
  os.replace(tmp, directory / "adapter_state.safetensors")


def _load_state_safetensors(model, directory: Path) -> None:
  from safetensors.numpy import load_file

  arrays = load_file(str(directory / "adapter_state.safetensors"))
  state = jlora.adapter_state(model)
  flat = [(path, arrays[".".join(map(str, path))]) for path, _ in nnx.to_flat_state(state)]
  nnx.update(model, nnx.from_flat_state(flat))


def export_adapter(model: nnx.Module, out: Path, probe_ids, save_merged: bool):
  """``(adapter_dir, merged_dir or None, checks)``; ``checks`` maps check name -> max |Δlogit|."""
  adapter_dir = out / "adapter"
  has_io = hasattr(jlora, "save_peft") and hasattr(jlora, "load_peft")
  if has_io:
    jlora.save_peft(model, str(adapter_dir))
  else:
    _save_state_safetensors(model, adapter_dir)
  checks: dict[str, float] = {}
  merged_dir = None
  if probe_ids is None and not save_merged:
    return adapter_dir, None, checks
  model.eval()
  reloaded = jlora.unload(nnx.clone(model))  # the base model: adapters removed, none merged
  if has_io:
    reloaded = jlora.load_peft(reloaded, str(adapter_dir))
  else:
    for name, config in jlora.peft_config(model).items():
      jlora.add_adapter(reloaded, name, config)
    jlora.set_adapter(reloaded, jlora.active_adapters(model))
    _load_state_safetensors(reloaded, adapter_dir)
  reloaded.eval()
  if probe_ids is not None:
    want = _logits(model, probe_ids)
    checks["reload_max_abs_diff"] = float(np.max(np.abs(_logits(reloaded, probe_ids) - want)))
  merged = jlora.merge_and_unload(reloaded)
  if probe_ids is not None:
    checks["merge_max_abs_diff"] = float(np.max(np.abs(_logits(merged, probe_ids) - want)))
  if save_merged:
    if not hasattr(jlora, "save_pretrained"):
      raise ValueError("save_merged=true needs jlora.save_pretrained (jlora.io), which is not installed.")
    merged_dir = out / "merged"
    jlora.save_pretrained(merged, str(merged_dir))
  model.train()
  return adapter_dir, merged_dir, checks
