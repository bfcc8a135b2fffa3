"""``TrainConfig``: one frozen dataclass for the whole job, from defaults, YAML and ``--set``.

Every field has a default that works, so ``TrainConfig()`` is the embedded demo
job. ``load_config(path, overrides)`` reads a YAML file of nested mappings
(``model: {name: ...}``) and applies ``"section.key=value"`` overrides; values
are parsed as YAML scalars and type-checked against the field annotations.
Unknown keys and wrong types raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml


class ConfigError(ValueError):
  """A config key that does not exist or a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The base model.

  Attributes:
    name: a preset name or a local Hugging Face checkpoint directory. Presets
      need no download: ``"byte-stories"`` is the pretrained byte-level Llama
      shipped with jlora (4 layers, 128 wide, trained on stories by
      ``scripts/train_base.py``); ``"tiny"`` is a smaller randomly
      initialised one for tests.
    dtype: dtype of the base weights (``float32``, ``bfloat16``, ``float16``).
    seed: PRNG seed for presets with random weights (``"tiny"``).
    remat: what the backward pass keeps per layer: ``"matmuls"`` (matmul and
      attention outputs; elementwise work is recomputed), ``"none"``
      (everything autodiff keeps; most memory) or ``"full"`` (layer inputs
      only; least memory, one extra forward pass).
    quantize: ``""`` (full precision) or ``"nf4"`` / ``"int8"`` / ``"fp8"``:
      store the loaded model's Linear kernels quantized and frozen under the
      adapter (``jlora.quantize``; QLoRA with ``"nf4"``). A model passed to
      ``jlora.train(model=...)`` is used as given (quantize it yourself).
    attention: the attention kernel: ``"auto"`` (splash on TPU, cuDNN on
      GPU, XLA elsewhere), ``"xla"``, ``"cudnn"`` (GPU only), ``"splash"``
      (TPU only), ``"splash_interpret"`` (the TPU kernel interpreted; slow,
      for tests), ``"tokamax"`` (tokamax's Pallas flash attention; Hopper
      GPUs, bf16; needs ``pip install 'jlora[tokamax]'``) or
      ``"tokamax_xla"`` (tokamax's XLA reference; any backend, for tests).
    lora_matmul: how LoRA linears compute (``jlora.nn.set_lora_matmul``):
      ``"plain"`` (default) computes ``x@W + s·(x@A)@B`` under plain
      autodiff; ``"auto"`` merges ``W + s·A·B`` on the fly for calls with
      many tokens and takes the low-rank backward (12% faster training on an
      H100 at TinyLlama shape), ``"fused"`` always merges. The merged forward
      rounds ``W + s·A·B`` to the base dtype once: in bf16 a small adapter
      delta is partly lost in the forward pass (as in merged bf16 inference),
      so use it with a float32 base or once the adapter's delta is large.
    scan_unroll: layers per step of the layer loop (``jax.lax.scan``'s
      ``unroll``): 1 (default) keeps one rolled loop and the shortest
      compile; 2 or more lets XLA fuse across layer boundaries and drop the
      per-layer stacking of saved activations, at a longer compile; the
      number of layers (or more) unrolls the loop fully, which keeps more
      activations alive (TinyLlama 8x2048 on an H100: 16.6 -> 26.2 GiB peak);
      the memory plan counts it.
  """

  name: str = "byte-stories"
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  seed: int = 0
  remat: Literal["none", "matmuls", "full"] = "matmuls"
  quantize: Literal["", "nf4", "int8", "fp8"] = ""
  attention: Literal["auto", "xla", "cudnn", "splash", "splash_interpret", "tokamax", "tokamax_xla"] = "auto"
  lora_matmul: Literal["auto", "fused", "plain"] = "plain"
  scan_unroll: int = 1


DEMO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                "lm_head")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """The adapter to train (mapped onto ``jlora.LoraConfig`` / ``MoSLoraConfig`` / ``WLoraConfig``).

  ``upstream_loras`` (PEFT adapter directories) is used by ``kind="wlora"`` only;
  ``use_dora`` (DoRA's magnitude vectors) by ``kind="lora"`` only.
  The default targets every projection plus the embedding and output head,
  which the byte-level demo base affords; for a large model ``"all-linear"``
  or the attention projections are the usual choice.
  """

  kind: Literal["lora", "moslora", "wlora"] = "lora"
  r: int = 16
  lora_alpha: float = 16.0
  target_modules: Union[str, tuple[str, ...]] = DEMO_TARGETS
  lora_dropout: float = 0.0
  use_rslora: bool = False
  mixer_init: Literal["orthogonal", "kaiming"] = "kaiming"
  use_dora: bool = False
  upstream_loras: tuple[str, ...] = ()
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training and held-out data.

  Attributes:
    path: a ``.jsonl`` / ``.json`` / ``.txt`` / ``.parquet`` file or a
      ``datasets`` directory saved with ``save_to_disk``; ``""`` is the Q/A
      records of the embedded demo corpus (``jlora/train/data/qa.jsonl``),
      a skill the shipped base model lacks.
    eval_path: held-out data in the same forms; ``""`` holds out
      ``eval_fraction`` of the training sequences instead.
    format: ``"text"`` (``text_field``), ``"instruction"`` (``prompt`` /
      ``completion``), ``"chat"`` (``messages``), or ``"auto"`` (per record).
    seq_len: tokens per training sequence.
    packing: pack several records into one sequence (else one per row, padded).
    tokenizer: ``""`` uses the model's (its checkpoint dir's tokenizer files
      for local models, bytes for presets); ``"bytes"`` forces the byte tokenizer.
    seed: shuffling seed (each epoch is a fresh deterministic permutation).
  """

  path: str = ""
  eval_path: str = ""
  format: Literal["auto", "text", "instruction", "chat"] = "auto"
  text_field: str = "text"
  seq_len: int = 128
  packing: bool = True
  eval_fraction: float = 0.1
  tokenizer: str = ""
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay, global-norm clipping and accumulation.

  ``loraplus_lr_ratio`` (e.g. 16) turns on LoRA+: B trains at that multiple of
  ``learning_rate`` and embedding adapters at ``loraplus_lr_embedding``.
  """

  learning_rate: float = 1e-2
  warmup_steps: int = 10
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0
  grad_accum: int = 1
  loraplus_lr_ratio: float | None = None
  loraplus_lr_embedding: float = 1e-6


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ``(data, fsdp, tensor)``; ``data=-1`` takes every device the others leave.

  ``fsdp=-1`` picks the smallest FSDP split (and, if needed, ``model.remat="full"``)
  whose memory plan fits the device. ``device_memory_gib`` overrides the
  device memory the plan checks against (``0``: read it from the device).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  device_memory_gib: float = 0.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints under ``<output_dir>/checkpoints``: every N optimizer steps, keep the last K."""

  every: int = 50
  keep: int = 2
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  """Where metrics go besides ``<output_dir>/metrics.jsonl``.

  Attributes:
    tensorboard: TensorBoard event files under ``<output_dir>/tensorboard``.
    wandb: also log to Weights & Biases (needs ``pip install wandb``).
    wandb_project: the wandb project.
    wandb_name: the wandb run name (``""``: wandb picks one).
  """

  tensorboard: bool = True
  wandb: bool = False
  wandb_project: str = "jlora"
  wandb_name: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The whole training job. ``TrainConfig()`` is the demo: a LoRA that teaches the shipped base
  (``byte-stories``) the embedded Q/A records, about 2 minutes on 2 CPU cores.

  Attributes:
    steps: optimizer steps (each is ``optim.grad_accum`` micro-batches).
    batch_size: sequences per micro-batch (global, over all devices).
    eval_every: held-out evaluation every N steps (and at the end).
    eval_batches: micro-batches per evaluation (``0``: the whole held-out set).
    loss_chunk_tokens: the loss runs the output head over about this many
      tokens at a time (a slice of every row), so the ``[tokens, vocab]``
      logits never exist at once (``0``: one pass; batches of at most this
      many tokens take one pass anyway).
    samples: generated samples written at the end (when ``jlora.generate`` exists).
    save_merged: also write the merged model in HF format (``jlora.save_pretrained``).
    overwrite: start afresh in an ``output_dir`` that holds a different run.
    progress: show a progress bar.
  """

  model: ModelConfig = ModelConfig()
  adapter: AdapterConfig = AdapterConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  report: ReportConfig = ReportConfig()
  output_dir: str = "jlora-run"
  steps: int = 300
  batch_size: int = 8
  eval_every: int = 50
  eval_batches: int = 4
  log_every: int = 10
  loss_chunk_tokens: int = 4096
  samples: int = 3
  save_merged: bool = False
  overwrite: bool = False
  progress: bool = True
  seed: int = 0

  def __post_init__(self):
    _check_values(self)

  def to_dict(self) -> dict:
    """Nested plain dict (YAML/JSON-ready; tuples become lists)."""
    return _plain(dataclasses.asdict(self))

  def replace(self, **overrides: Any) -> "TrainConfig":
    """A copy with dotted-key overrides: ``cfg.replace(**{"optim.learning_rate": 1e-3})``."""
    return from_dict(_merge(self.to_dict(), {k: v for k, v in overrides.items()}, flat=True))


def _plain(x):
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _non_finite(obj, prefix: str = "") -> list[tuple[str, float]]:
  """``(dotted key, value)`` of every float field that is NaN or infinite."""
  bad = []
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      bad += _non_finite(value, f"{prefix}{f.name}.")
    elif isinstance(value, float) and not math.isfinite(value):
      bad.append((prefix + f.name, value))
  return bad


def _check_values(cfg: TrainConfig) -> None:
  for key, value in _non_finite(cfg):
    raise ConfigError(f"{key} must be a finite number, got {value}; set it to a real value "
                      f"(default: {_default(key)}).")
  positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "eval_every": cfg.eval_every,
              "log_every": cfg.log_every, "data.seq_len": cfg.data.seq_len, "adapter.r": cfg.adapter.r,
              "optim.grad_accum": cfg.optim.grad_accum, "checkpoint.every": cfg.checkpoint.every,
              "checkpoint.keep": cfg.checkpoint.keep, "model.scan_unroll": cfg.model.scan_unroll}
  for key, value in positive.items():
    if value < 1:
      raise ConfigError(f"{key} must be >= 1, got {value}.")
  for key, value in {"eval_batches": cfg.eval_batches, "samples": cfg.samples,
                     "loss_chunk_tokens": cfg.loss_chunk_tokens,
                     "optim.warmup_steps": cfg.optim.warmup_steps}.items():
    if value < 0:
      raise ConfigError(f"{key} must be >= 0, got {value}.")
  if not 0.0 <= cfg.data.eval_fraction < 1.0:
    raise ConfigError(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}.")
  if cfg.optim.learning_rate <= 0:
    raise ConfigError(f"optim.learning_rate must be > 0, got {cfg.optim.learning_rate}.")
  if cfg.optim.loraplus_lr_ratio is not None and cfg.optim.loraplus_lr_ratio <= 0:
    raise ConfigError(f"optim.loraplus_lr_ratio must be > 0 (PEFT suggests 16) or null (off), got "
                      f"{cfg.optim.loraplus_lr_ratio}.")
  if cfg.optim.loraplus_lr_embedding <= 0:
    raise ConfigError(f"optim.loraplus_lr_embedding must be > 0, got {cfg.optim.loraplus_lr_embedding}.")
  for axis in ("tensor",):
    if getattr(cfg.mesh, axis) < 1:
      raise ConfigError(f"mesh.{axis} must be >= 1, got {getattr(cfg.mesh, axis)}.")
  if cfg.mesh.fsdp < 1 and cfg.mesh.fsdp != -1:
    raise ConfigError(f"mesh.fsdp must be >= 1 or -1 (the smallest that fits), got {cfg.mesh.fsdp}.")
  if cfg.mesh.device_memory_gib < 0:
    raise ConfigError(f"mesh.device_memory_gib must be >= 0 (0: read it from the device), got "
                      f"{cfg.mesh.device_memory_gib}.")
  if cfg.mesh.data < 1 and cfg.mesh.data != -1:
    raise ConfigError(f"mesh.data must be >= 1 or -1 (all remaining devices), got {cfg.mesh.data}.")
  if cfg.adapter.use_dora and cfg.adapter.kind != "lora":
    raise ConfigError(f"adapter.use_dora=true needs adapter.kind=lora (got {cfg.adapter.kind!r}); "
                      "DoRA does not combine with MoSLoRA or WLoRA.")
  if cfg.adapter.kind == "wlora" and not cfg.adapter.upstream_loras:
    raise ConfigError("adapter.kind=wlora needs adapter.upstream_loras: a list of PEFT adapter directories.")


def _default(key: str):
  node = TrainConfig.__dataclass_fields__
  *sections, leaf = key.split(".")
  for section in sections:
    node = type(node[section].default).__dataclass_fields__
  return node[leaf].default


# ---------------------------------------------------------------------------- loading


def from_dict(values: Mapping[str, Any], cls: type = TrainConfig, prefix: str = ""):
  """Build ``cls`` from a nested mapping, checking every key and type."""
  if not isinstance(values, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(values).__name__}.")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(
        f"Unknown config key {(prefix + unknown[0])!r}; valid keys under "
        f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}.")
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    key = prefix + name
    if dataclasses.is_dataclass(hint):
      kwargs[name] = from_dict(value, hint, key + ".")
    else:
      kwargs[name] = _coerce(value, hint, key)
  return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
  """``TrainConfig`` from an optional YAML file plus ``"a.b=value"`` overrides."""
  values: dict = {}
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise ConfigError(f"Config file {str(path)!r} does not exist.")
    try:
      values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
      raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys, got {type(values).__name__}.")
  flat = {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"Override {item!r} must look like key=value (e.g. optim.learning_rate=1e-3).")
    flat[key.strip()] = _parse_scalar(raw)
  return from_dict(_merge(values, flat, flat=True))


def _parse_scalar(raw: str):
  try:
    return yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    return raw


def _merge(base: dict, updates: Mapping[str, Any], flat: bool) -> dict:
  out = _plain(dict(base))
  for key, value in updates.items():
    parts = key.split(".") if flat else [key]
    node = out
    for i, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ConfigError(f"Unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section.")
      node = child
    node[parts[-1]] = value
  return out


def _coerce(value, hint, key: str):
  """``value`` checked against ``hint`` (int->float widening, list->tuple); ConfigError if it does not fit."""
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    for option in typing.get_args(hint):
      try:
        return _coerce(value, option, key)
      except ConfigError:
        pass
    raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}.")
  if origin is Literal:
    if value in typing.get_args(hint) and type(value) is type(typing.get_args(hint)[0]):
      return value
    raise ConfigError(f"{key} must be one of {list(typing.get_args(hint))}, got {value!r}.")
  if origin is tuple:
    if isinstance(value, (list, tuple)):
      (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
      return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}.")
  if hint is type(None):
    if value is None:
      return None
  elif hint is bool:
    if isinstance(value, bool):
      return value
  elif hint is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif hint is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
  elif hint is str:
    if isinstance(value, str):
      return value
  raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r} ({type(value).__name__}).")


def _describe(hint) -> str:
  origin = typing.get_origin(hint)
  if origin in (Union, types.UnionType):
    return " or ".join(_describe(a) for a in typing.get_args(hint))
  if origin is tuple:
    return f"a list of {_describe(typing.get_args(hint)[0])}"
  if origin is Literal:
    return f"one of {list(typing.get_args(hint))}"
  return {type(None): "null", bool: "a bool", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))
