"""Check a PEFT adapter directory against a base model before the base's weights are loaded.

Loading an 8B base takes minutes; an adapter that cannot go on it should fail
in a second. ``check_adapter`` reads the adapter (config and tensors: small)
and compares every LoRA factor with the module it targets in the base, which
may be abstract (``nnx.eval_shape``, shapes only), so nothing of the base is
read but its ``config.json``. ``abstract_model`` builds that abstract base.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from jlora.io._hf import _read_config
from jlora.io._peft_config import CONFIG_NAME
from jlora.io._peft_layout import PREFIX
from jlora.io._peft_load import WEIGHTS_NAME, read_adapter
from jlora.nn import candidates

# PEFT's factor suffixes: (factor, layer kind) -> the suffix after the module name.
_SUFFIXES = {".lora_A.weight": ("A", "linear"), ".lora_B.weight": ("B", "linear"),
             ".lora_embedding_A": ("A", "embed"), ".lora_embedding_B": ("B", "embed")}


def abstract_model(model_dir: str | os.PathLike) -> nnx.Module:
  """The model ``config.json`` of ``model_dir`` describes, built abstractly: shapes and names, no weights."""
  family, config = _read_config(Path(model_dir).expanduser())
  return nnx.eval_shape(lambda: family.model_class(config, rngs=nnx.Rngs(0)))


def check_adapter(adapter_dir: str | os.PathLike, base: nnx.Module | None = None):
  """The adapter's jlora config, once the directory is known to load onto ``base``.

  Checks what ``load_peft`` would find only after the base is loaded: the
  directory, its config (JSON, ``peft_type``, unknown fields), its weights
  file (safetensors, whole, finite), and with ``base`` (a model, or
  ``abstract_model``'s) that every LoRA factor names a module of the base
  and has that module's sizes and the config's rank.

  Raises:
    ValueError: naming the problem and the fix.
  """
  path = Path(adapter_dir).expanduser()
  if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / "config.json").is_file():
    raise ValueError(f"{path} is a model checkpoint, not a PEFT adapter (it has config.json but no {CONFIG_NAME}); "
                     "pass the adapter's directory (adapter_config.json + adapter_model.safetensors).")
  config, tensors = read_adapter(path)
  if base is not None:
    _check_fit(config, tensors, base, path)
  return config


def _module_sizes(base: nnx.Module) -> dict[str, tuple[str, int, int]]:
  """``{PEFT module name: (kind, in, out)}`` of the base's Linear and Embed layers."""
  sizes = {}
  for cand in candidates(base):
    layer = cand.base
    if isinstance(layer, nnx.Embed):
      num, dim = layer.embedding.shape[-2:]
      sizes.update({name: ("embed", num, dim) for name in cand.names})
    elif hasattr(layer, "in_features") and hasattr(layer, "out_features"):
      sizes.update({name: ("linear", layer.in_features, layer.out_features) for name in cand.names})
  return sizes


def _check_fit(config, tensors: dict, base: nnx.Module, path: Path) -> None:
  sizes = _module_sizes(base)
  foreign = []
  for key, tensor in sorted(tensors.items()):
    suffix = next((s for s in _SUFFIXES if key.startswith(PREFIX) and key.endswith(s)), None)
    if suffix is None:
      continue
    module = key[len(PREFIX):-len(suffix)]
    factor, kind = _SUFFIXES[suffix]
    if module not in sizes or sizes[module][0] != kind:
      foreign.append(key)
      continue
    _, n_in, n_out = sizes[module]
    r = config.rank_for(module) if hasattr(config, "rank_for") else None
    # PEFT: A [r, in] and B [out, r] (linear); embedding A [r, num] and B [dim, r].
    want = (r, n_in) if factor == "A" else (n_out, r)
    got = tuple(tensor.shape)
    if len(got) != 2 or any(w is not None and g != w for g, w in zip(got, want)):
      size_ok = len(got) == 2 and (got[1] == n_in if factor == "A" else got[0] == n_out)
      if size_ok:
        raise ValueError(f"{path / WEIGHTS_NAME}: tensor {key!r} has shape {got}, but rank {r} from "
                         f"{CONFIG_NAME}'s r/rank_pattern needs {want}: the config does not match the weights.")
      raise ValueError(f"{path / WEIGHTS_NAME}: tensor {key!r} has shape {got}, which does not fit the base model's "
                       f"{module} ({n_in} in, {n_out} out): the adapter was trained on another base model.")
  if foreign:
    raise ValueError(f"{path / WEIGHTS_NAME}: {len(foreign)} tensor(s) target modules the base model lacks, e.g. "
                     f"{', '.join(foreign[:3])}; the adapter does not fit the base model (another architecture or "
                     "more layers).")
