"""Hugging Face checkpoint directories <-> jlora models.

A directory holds ``config.json`` and safetensors weights (``model.safetensors``
or shards listed in ``model.safetensors.index.json``). Parameter names map
one to one: the model's attribute path, with each stacked layer's index
inserted after its container (``model.layers.3...``), ``kernel``/``embedding``
renamed ``weight``; ``nn.Linear`` weights ``[out, in]`` are transposed to
Flax's ``[in, out]`` (GPT-2's ``Conv1D`` already is ``[in, out]``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.io import _safetensors
from jlora.models import ModelConfig, from_hf_config, model_class
from jlora.models._config import SUPPORTED
from jlora.nn import LoraLayer
from jlora.nn._targets import STACK_ATTR
from jlora.quant import LoadQuantizer, QuantizedWeight

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_CONVERT = ("convert it to safetensors with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)")
# HF buffers and tied copies that a checkpoint may hold and a jlora model does not need.
_IGNORED = (r".*\.attn\.(masked_)?bias$", r".*rotary_emb\.inv_freq$")


def _read_config(model_dir: Path) -> ModelConfig:
  if not model_dir.is_dir():
    raise ValueError(f"Checkpoint directory {model_dir} does not exist; pass a local directory holding "
                     "config.json and model.safetensors (download it first, e.g. `hf download`).")
  path = model_dir / "config.json"
  if not path.is_file():
    raise ValueError(f"{model_dir} has no config.json; a Hugging Face checkpoint directory needs one "
                     "(save the model with transformers' save_pretrained, which writes it).")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); fix or re-download the file.") from None
  if not isinstance(raw, dict) or raw.get("model_type") not in SUPPORTED:
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    raise ValueError(f"{path} has model_type={kind!r}, which jlora does not implement; supported model "
                     f"types: {', '.join(SUPPORTED)}.")
  from transformers import AutoConfig
  return from_hf_config(AutoConfig.from_pretrained(str(model_dir)))


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint in ``model_dir`` (single file or shards)."""
  if (model_dir / SINGLE).exists():
    return _safetensors.read(model_dir / SINGLE)
  index = model_dir / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index} is malformed ({e!r}); it needs a 'weight_map' of tensor name -> shard "
                       "file. Re-save or re-download the checkpoint.") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      if not (model_dir / shard).is_file():
        raise ValueError(f"Shard {model_dir / shard} listed in {index} is missing; download every shard "
                         "of the checkpoint.")
      tensors.update(_safetensors.read(model_dir / shard))
    return tensors
  pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
  if pickled:
    raise ValueError(f"{model_dir} holds only pickled weights ({', '.join(pickled)}); jlora never "
                     f"unpickles files. {_CONVERT}.")
  raise ValueError(f"{model_dir} has no {SINGLE} (or {INDEX} with shards); download the weights too.")


def _stacked_prefixes(model: nnx.Module) -> dict[tuple, int]:
  return {tuple(path): getattr(node, STACK_ATTR) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) and hasattr(node, STACK_ATTR)}


def _param_names(model: nnx.Module):
  """``(path, hf_names, transpose, stacked)`` per parameter; one HF name per stacked layer."""
  stacks = _stacked_prefixes(model)
  transpose_kernels = model.config.model_type != "gpt2"
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    leaf = path[-1]
    parts = [str(p) for p in path[:-1]] + ["weight" if leaf in ("kernel", "embedding") else str(leaf)]
    prefix = next((p for p in stacks if tuple(path[: len(p)]) == p), None)
    if prefix is None:
      names = (".".join(parts),)
    else:
      head, tail = ".".join(parts[: len(prefix)]), ".".join(parts[len(prefix):])
      names = tuple(f"{head}.{i}.{tail}" for i in range(stacks[prefix]))
    yield path, names, transpose_kernels and leaf == "kernel", prefix is not None


def _hf_layout(array: np.ndarray, transpose: bool) -> np.ndarray:
  return np.swapaxes(array, -1, -2) if transpose else array


def from_pretrained(model_dir: str | os.PathLike, dtype=jnp.bfloat16, param_dtype=None, *,
                    quantize: str | None = None, quantize_options: dict | None = None) -> nnx.Module:
  """Load a local HF checkpoint directory into a jlora model.

  Args:
    model_dir: directory with ``config.json`` and safetensors weights.
    dtype: computation dtype of activations.
    param_dtype: dtype of the parameters (default: ``dtype``).
    quantize: ``"nf4"``, ``"int8"`` or ``"fp8"`` to store the Linear kernels
      quantized (``jlora.quantize``), each as soon as it is read, so peak
      memory is the quantized model plus one tensor.
    quantize_options: ``block_size``, ``double_quant``, ``targets`` for ``jlora.quantize``.

  Returns:
    ``CausalLM`` (llama, mistral, qwen2, qwen3) or ``Gpt2LMHeadModel``:
    ``model(input_ids [B, T], attention_mask=None, positions=None) -> logits [B, T, V]``.

  Raises:
    ValueError: a missing/malformed directory, config or weights file, an
      unsupported model type, or weights that do not fit the config.
  """
  model_dir = Path(model_dir).expanduser()
  config = _read_config(model_dir)
  param_dtype = param_dtype or dtype
  cls = model_class(config)
  abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  quantizer = LoadQuantizer(abstract, quantize, **(quantize_options or {})) if quantize else None
  tensors = read_weights(model_dir)
  if config.model_type == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
    tensors = {("lm_head.weight" if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in tensors.items()}
  used = set()
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  missing = []
  for path, names, transpose, is_stacked in _param_names(abstract):
    if any(n not in tensors for n in names):
      missing += [n for n in names if n not in tensors]
      continue
    want = tuple(flat[path].shape[1:] if is_stacked else flat[path].shape)
    want_hf = want[::-1] if transpose else want
    for name in names:
      if tuple(tensors[name].shape) != want_hf:
        raise ValueError(f"{model_dir}: tensor {name!r} has shape {tuple(tensors[name].shape)} but "
                         f"config.json implies {want_hf}; the weights do not belong to this config "
                         "(check config.json).")
    arrays = [_hf_layout(tensors[n], transpose) for n in names]
    value = np.stack(arrays) if is_stacked else arrays[0]
    if quantizer is None or not quantizer.take(path, value):
      flat[path].set_value(jnp.asarray(value, dtype=param_dtype))
    used.update(names)
  if missing:
    raise ValueError(f"{model_dir}: the checkpoint lacks {len(missing)} weight(s) that config.json needs, "
                     f"e.g. {', '.join(missing[:5])}; the weights are incomplete or belong to another model.")
  unexpected = [k for k in tensors if k not in used and not _ignorable(k, config)]
  if unexpected:
    raise ValueError(f"{model_dir}: the checkpoint has {len(unexpected)} weight(s) this "
                     f"{config.model_type} model does not use, e.g. {', '.join(sorted(unexpected)[:5])}; "
                     "check that config.json matches the weights (layer count, tie_word_embeddings).")
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return quantizer.finish(model) if quantizer is not None else model


def _ignorable(name: str, config: ModelConfig) -> bool:
  if name == "lm_head.weight" and config.tie_word_embeddings:
    return True
  return any(re.fullmatch(p, name) for p in _IGNORED)


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike) -> Path:
  """Write ``config.json`` and ``model.safetensors`` that transformers loads as the same model.

  Each file is written to a temp name and renamed. A model carrying LoRA
  layers is refused: merge first with ``jlora.merge_and_unload(model)``.
  """
  if any(isinstance(node, LoraLayer) for _, node in nnx.iter_graph(model)):
    raise ValueError("save_pretrained writes plain HF weights but this model has LoRA layers; call "
                     "jlora.merge_and_unload(model) first (or save just the adapter).")
  if nnx.to_flat_state(nnx.state(model, QuantizedWeight)):
    raise ValueError("save_pretrained writes full-precision HF weights but this model's Linear kernels are "
                     "quantized; call jlora.dequantize(model) (or jlora.merge_and_unload(model), which "
                     "dequantizes) first, or save just the adapter with jlora.save_peft.")
  config = getattr(model, "config", None)
  if not isinstance(config, ModelConfig):
    raise ValueError("save_pretrained needs a jlora.models model (with a ModelConfig at .config), "
                     f"got {type(model).__name__}.")
  out_dir = Path(out_dir).expanduser()
  out_dir.mkdir(parents=True, exist_ok=True)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}
  for path, names, transpose, is_stacked in _param_names(model):
    value = np.asarray(jax.device_get(flat[path][...]))
    for i, name in enumerate(names):
      tensors[name] = _hf_layout(value[i] if is_stacked else value, transpose)
  dtypes = {str(v.dtype) for v in tensors.values()}
  _safetensors.write(tensors, out_dir / SINGLE)
  hf = config.hf_dict()
  if len(dtypes) == 1:
    hf["dtype"] = dtypes.pop()
  tmp = out_dir / ".config.json.tmp"
  tmp.write_text(json.dumps(hf, indent=2, sort_keys=True))
  os.replace(tmp, out_dir / "config.json")
  _remove_stale_shards(out_dir)
  return out_dir


def _remove_stale_shards(out_dir: Path) -> None:
  index = out_dir / INDEX
  if not index.is_file():
    return
  try:
    shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
  except (json.JSONDecodeError, AttributeError):
    shards = set()
  index.unlink()
  for shard in shards:
    if shard != SINGLE and (out_dir / shard).is_file():
      (out_dir / shard).unlink()
