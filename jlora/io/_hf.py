"""Hugging Face checkpoint directories <-> jlora models.

A directory holds ``config.json`` and safetensors weights (``model.safetensors``
or shards listed in ``model.safetensors.index.json``). Parameter names map
one to one: the model's attribute path, with each stacked layer's index
inserted after its container (``model.layers.3...``), ``kernel``/``embedding``
renamed ``weight``; ``nn.Linear`` weights ``[out, in]`` are transposed to
Flax's ``[in, out]`` unless the family says its checkpoints store ``[in, out]``
(GPT-2's ``Conv1D``). Everything family-specific (which ``model_type`` values
load, the config mapping, renamed or ignored tensors) comes from the family
registry of ``jlora.models``.
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
from jax.sharding import Mesh

from jlora.io import _safetensors
from jlora.io._files import check_directory_path, writing
from jlora.io._placement import ParamSource, check_mesh, place, sharding_for
from jlora.models import Family, FamilyConfig, family_for, family_of
from jlora.nn import STACK_ATTR, LoraLayer
from jlora.quant import LoadQuantizer, QuantizedWeight

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
_CONVERT = ("convert it to safetensors with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)")


def _read_config(model_dir: Path) -> tuple[Family, FamilyConfig]:
  if model_dir.is_file():
    raise ValueError(f"Checkpoint path {model_dir} is a file; pass the directory that holds config.json "
                     f"and the weights (probably {model_dir.parent}).")
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
  try:
    family = family_for(raw.get("model_type") if isinstance(raw, dict) else None)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  _check_heads(raw, path)
  from transformers import AutoConfig
  return family, family.from_hf(AutoConfig.from_pretrained(str(model_dir)))


def _check_heads(raw: dict, path: Path) -> None:
  """Head counts must split the hidden size (and the KV heads the query heads), checked before transformers."""
  hidden = raw.get("hidden_size", raw.get("n_embd"))
  heads = raw.get("num_attention_heads", raw.get("n_head"))
  kv = raw.get("num_key_value_heads") or heads
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in (hidden, heads, kv)):
    return  # absent: transformers' defaults apply
  if min(hidden, heads, kv) < 1:
    raise ValueError(f"{path}: hidden size {hidden}, {heads} attention heads and {kv} key/value heads must "
                     "all be positive; fix config.json.")
  if hidden % heads:
    raise ValueError(f"{path}: the hidden size {hidden} is not a multiple of the {heads} attention heads; "
                     "fix config.json so that hidden_size is divisible by num_attention_heads.")
  if heads % kv:
    raise ValueError(f"{path}: the {heads} attention heads are not a multiple of the {kv} key/value heads; "
                     "fix config.json so that num_attention_heads is divisible by num_key_value_heads.")


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


def _param_names(model: nnx.Module, family: Family):
  """``(path, hf_names, transpose, stacked)`` per parameter; one HF name per stacked layer."""
  stacks = _stacked_prefixes(model)
  transpose_kernels = family.transpose_kernels
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


def from_pretrained(model_dir: str | os.PathLike, dtype=jnp.bfloat16, param_dtype=None,
                    mesh: Mesh | None = None, *, quantize: str | None = None,
                    quantize_options: dict | None = None) -> nnx.Module:
  """Load a local HF checkpoint directory into a jlora model.

  The model is built abstractly (no weights allocated); each parameter is
  then read from the memory-mapped safetensors files block by block straight
  onto its devices, so host memory peaks at about one parameter, not the model.

  Args:
    model_dir: directory with ``config.json`` and safetensors weights.
    dtype: computation dtype of activations; ``bfloat16`` by default, whatever
      the checkpoint's ``torch_dtype`` (a float32 checkpoint loads as bfloat16:
      pass ``jnp.float32`` to keep it), so a model's memory does not depend on
      how it was saved.
    param_dtype: dtype of the parameters (default: ``dtype``); each block is
      converted as it is read.
    mesh: a ``(data, fsdp, tensor)`` mesh (``make_mesh`` of ``jlora.train``): every
      device reads only its shard of each parameter, laid out by the sharding
      rules (``param_spec`` of ``jlora.train``); in a multi-host job each
      process reads only what its devices hold. None: whole arrays on the
      default device.
    quantize: ``"nf4"``, ``"int8"`` or ``"fp8"`` to store the Linear kernels
      quantized (``jlora.quantize``), each as soon as it is placed, so device
      memory peaks at the quantized model plus one parameter.
    quantize_options: ``block_size``, ``double_quant``, ``targets`` for ``jlora.quantize``.

  Returns:
    The family's ``LanguageModel`` (``CausalLM`` for llama, mistral, qwen2,
    qwen3; ``Gpt2LMHeadModel``; or a registered family's class):
    ``model(input_ids [B, T], attention_mask=None, positions=None) -> logits [B, T, V]``.

  Raises:
    ValueError: a missing/malformed directory, config or weights file, an
      unsupported model type, weights that do not fit the config, or a
      ``mesh`` that is not a ``(data, fsdp, tensor)`` Mesh.
  """
  model_dir = Path(model_dir).expanduser()
  check_mesh(mesh)
  family, config = _read_config(model_dir)
  param_dtype = param_dtype or dtype
  cls = family.model_class
  abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  quantizer = LoadQuantizer.for_options(abstract, quantize, quantize_options)
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  for source in param_sources(model_dir, abstract, family):
    sharding = None if mesh is None else sharding_for(source, mesh)
    value = place(source, param_dtype, sharding)
    if quantizer is None or not quantizer.take(source.path, value):
      flat[source.path].set_value(value)
    del value
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  model = quantizer.finish(model) if quantizer is not None else model
  setattr(model, SOURCE_ATTR, str(model_dir))
  return model


SOURCE_ATTR = "jlora_name_or_path"


def source_of(model: nnx.Module) -> str | None:
  """The checkpoint directory ``from_pretrained`` loaded ``model`` from (None if it did not)."""
  return getattr(model, SOURCE_ATTR, None)


def param_sources(model_dir: Path, abstract: nnx.Module, family: Family) -> list[ParamSource]:
  """Where each parameter of ``abstract`` (a ``family`` model) is in the checkpoint, checked against the headers.

  Only the safetensors headers are read (the data stays memory-mapped), so a
  checkpoint that does not fit the config fails before any weight is loaded.
  """
  config = abstract.config
  tensors = family.read_checkpoint_names(read_weights(model_dir))
  used = set()
  flat = dict(nnx.to_flat_state(nnx.state(abstract)))
  missing, sources = [], []
  for path, names, transpose, is_stacked in _param_names(abstract, family):
    if any(n not in tensors for n in names):
      missing += [n for n in names if n not in tensors]
      continue
    shape = tuple(flat[path].shape)
    want = shape[1:] if is_stacked else shape
    want_hf = want[::-1] if transpose else want
    for name in names:
      if tuple(tensors[name].shape) != want_hf:
        raise ValueError(f"{model_dir}: tensor {name!r} has shape {tuple(tensors[name].shape)} but "
                         f"config.json implies {want_hf}; the weights do not belong to this config "
                         "(check config.json).")
    sources.append(ParamSource(path, names, tuple(tensors[n] for n in names), transpose, is_stacked, shape))
    used.update(names)
  if missing:
    raise ValueError(f"{model_dir}: the checkpoint lacks {len(missing)} weight(s) that config.json needs, "
                     f"e.g. {', '.join(missing[:5])}; the weights are incomplete or belong to another model.")
  unexpected = [k for k in tensors if k not in used and not _ignorable(k, config, family)]
  if unexpected:
    raise ValueError(f"{model_dir}: the checkpoint has {len(unexpected)} weight(s) this "
                     f"{config.model_type} model does not use, e.g. {', '.join(sorted(unexpected)[:5])}; "
                     "check that config.json matches the weights (layer count, tie_word_embeddings).")
  return sources


def _ignorable(name: str, config: FamilyConfig, family: Family) -> bool:
  if name == "lm_head.weight" and config.tie_word_embeddings:
    return True
  return family.ignores(name)


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
  """Write ``config.json`` and ``model.safetensors`` that transformers loads as the same model.

  Each file is written to a temp name and renamed; a failed write leaves no
  temp file. A model carrying LoRA layers is refused: merge first with
  ``jlora.merge_and_unload(model)``. ``out_dir`` may be new, hold no
  checkpoint files, or hold a checkpoint jlora wrote (it leaves a small
  ``.jlora`` marker); another checkpoint there is only replaced with
  ``overwrite=True``. Other files (a tokenizer, a README) are kept.
  """
  if any(isinstance(node, LoraLayer) for _, node in nnx.iter_graph(model)):
    raise ValueError("save_pretrained writes plain HF weights but this model has LoRA layers; call "
                     "jlora.merge_and_unload(model) first (or save just the adapter).")
  if nnx.to_flat_state(nnx.state(model, QuantizedWeight)):
    raise ValueError("save_pretrained writes full-precision HF weights but this model's Linear kernels are "
                     "quantized; call jlora.dequantize(model) (or jlora.merge_and_unload(model), which "
                     "dequantizes) first, or save just the adapter with jlora.save_peft.")
  family = family_of(model)
  if family is None:
    raise ValueError("save_pretrained needs a model of a registered jlora.models family (a LanguageModel), "
                     f"got {type(model).__name__}.")
  config = model.config
  out_dir = Path(out_dir).expanduser()
  _check_save_target(out_dir, overwrite)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  tensors = {}
  for path, names, transpose, is_stacked in _param_names(model, family):
    value = np.asarray(jax.device_get(flat[path][...]))
    for i, name in enumerate(names):
      tensors[name] = _hf_layout(value[i] if is_stacked else value, transpose)
  tensors = family.write_checkpoint_names(tensors)
  dtypes = {str(v.dtype) for v in tensors.values()}
  hf = config.hf_dict()
  if len(dtypes) == 1:
    hf["dtype"] = dtypes.pop()
  with writing(out_dir, "the model"):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by jlora.save_pretrained\n")
    _safetensors.write(tensors, out_dir / SINGLE)
    _safetensors.write_text(json.dumps(hf, indent=2, sort_keys=True), out_dir / "config.json")
    _remove_stale_shards(out_dir)
  return out_dir


MARKER = ".jlora"  # left by save_pretrained: the checkpoint files here are jlora's to replace


def _check_save_target(out_dir: Path, overwrite: bool) -> None:
  check_directory_path(out_dir, "save_pretrained's out_dir")
  if overwrite or not out_dir.is_dir() or (out_dir / MARKER).is_file():
    return
  ours = ("config.json", SINGLE, INDEX)
  found = sorted(p.name for p in out_dir.iterdir()
                 if p.name in ours or re.fullmatch(r"model-\d+-of-\d+\.safetensors", p.name))
  if found:
    raise ValueError(f"{out_dir} already holds a checkpoint jlora did not write ({', '.join(found)}); "
                     "refusing to overwrite it. Choose a new or empty directory, or pass overwrite=True.")


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
