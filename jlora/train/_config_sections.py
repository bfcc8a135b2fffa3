"""The sections of ``TrainConfig``: model, adapter, data, optimizer, mesh, checkpoints, reports.

Each is a frozen dataclass whose defaults make the embedded demo job; the
YAML file and ``--set`` overrides name a field as ``section.key``. The
adapter section is the adapter kind's own config (``jlora.LoraConfig`` and
friends, any registered kind), chosen by ``adapter.kind``, so every field of
that config is a key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

from jlora.nn import LoraConfig, kind_for_config, registered_kinds
from jlora.train._config_parse import ConfigError, from_dict


@dataclasses.dataclass(frozen=True)
class ModelSection:
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
      many tokens and takes the low-rank backward (11% faster training on an
      H100 at TinyLlama shape), ``"fused"`` always merges: the merged forward
      rounds ``W + s·A·B`` to the base dtype once, so in bf16 an update below
      half of W's spacing is lost from the forward pass (as in merged bf16
      inference; plain's final bf16 add loses one below half of y's spacing);
      ``"exact"`` computes ``[x | x@A]·[W ; s·B]`` as one matmul with one
      float32 accumulation and one rounding, which keeps such updates, but
      trains 5% slower than plain on an H100 (under tensor parallelism it
      runs as ``"plain"``).
    scan_unroll: layers per step of the layer loop (``jax.lax.scan``'s
      ``unroll``): ``"auto"`` (default) unrolls the loop fully where the
      memory plan says the unrolled step fits the device with room to spare
      (``jlora.train.choose_scan_unroll``; 9% faster at TinyLlama 8x2048 on
      an H100), else keeps it rolled (CPU, FSDP, a tight fit);
      1 keeps one rolled loop and the shortest
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
  lora_matmul: Literal["plain", "auto", "fused", "exact"] = "plain"
  scan_unroll: int | Literal["auto"] = "auto"


DEMO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                "lm_head")


def adapter_kinds() -> dict[str, type]:
  """``adapter.kind`` -> config class: every registered adapter kind (``jlora.register_adapter_kind``), by
  its name in lower case (``lora``, ``dora``, ``moslora``, ``wlora``, ``vera``, ...). Every field of the
  config class is a key of the section, with that class's defaults and validation."""
  return {name.lower(): kind.config_type for name, kind in registered_kinds().items()}


# The job's own defaults for LoRA-family kinds (their config extends ``LoraConfig``: LoRA, DoRA,
# MoSLoRA), where ``LoraConfig`` alone says r=8, lora_alpha=8 and no targets: the byte-level demo base
# affords rank 16 on every projection plus the embedding and output head. Other kinds start from their
# config's own defaults.
JOB_LORA_DEFAULTS = dict(r=16, lora_alpha=16.0, target_modules=DEMO_TARGETS)


def adapter_section(kind: str = "lora", **fields: Any):
  """The job's adapter: kind ``kind``'s own config (``jlora.LoraConfig``, ``MoSLoraConfig``, ...) with
  ``fields``, over the job's defaults for LoRA-family kinds (``JOB_LORA_DEFAULTS``).

  ``adapter_section()`` is the demo's adapter; ``adapter_section("moslora", r=8)`` a MoSLoRA of rank 8.
  In YAML and ``--set`` the section is ``adapter: {kind: ..., <the kind config's fields>}``.
  """
  return parse_adapter({"kind": kind, **fields})


def adapter_kind(config) -> str:
  """The ``adapter.kind`` name of a kind config (the registered kind that builds it, in lower case)."""
  try:
    return kind_for_config(config).name.lower()
  except TypeError as e:
    raise ConfigError(f"adapter must be an adapter kind's config: {e}") from None


def parse_adapter(values: Mapping[str, Any], prefix: str = "adapter."):
  """The kind config of an ``adapter`` mapping (``kind`` plus that kind's fields), each key type-checked."""
  if not isinstance(values, Mapping):
    raise ConfigError(f"{prefix.rstrip('.')} must be a mapping, got {type(values).__name__}.")
  fields = dict(values)
  kind = fields.pop("kind", "lora")
  kinds = adapter_kinds()
  if kind not in kinds:
    raise ConfigError(f"{prefix}kind must be one of {list(kinds)}, got {kind!r}.")
  cls = kinds[kind]
  defaults = JOB_LORA_DEFAULTS if issubclass(cls, LoraConfig) else {}
  try:
    config = from_dict({**defaults, **fields}, cls, prefix)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{prefix.rstrip('.')} (kind {kind}): {e}") from None
  built = adapter_kind(config)
  if built != kind and registered_kinds()[_registered_name(kind)].selects is not None:
    raise ConfigError(f"{prefix}kind={kind}, but this {cls.__name__} makes a {built} adapter; set the "
                      f"{cls.__name__} field that selects {kind} (DoRA: {prefix}use_dora=true).")
  return config


def _registered_name(kind: str) -> str:
  return next(name for name in registered_kinds() if name.lower() == kind)


def adapter_to_dict(config) -> dict:
  """``{"kind": ..., <every field of the kind's config>}``: the section as YAML writes it."""
  return {"kind": adapter_kind(config), **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}}


def planned_adapter(config) -> tuple[int, Any]:
  """``(rank, target_modules)`` the memory plan counts: the adapter's own, or for kinds without a rank
  of their own (WLoRA mixes its upstreams) the job's LoRA defaults as the estimate."""
  own = adapter_to_dict(config)
  if "r" in own:
    return own["r"], own.get("target_modules")
  return JOB_LORA_DEFAULTS["r"], JOB_LORA_DEFAULTS["target_modules"]


def adapter_field():
  """``TrainConfig.adapter``: the kind config, read and written as a section by ``parse_adapter`` / ``adapter_to_dict``."""
  return dataclasses.field(default=adapter_section(), metadata={"parse": parse_adapter, "plain": adapter_to_dict})


@dataclasses.dataclass(frozen=True)
class DataSection:
  """Training and held-out data.

  Attributes:
    path: a ``.jsonl`` / ``.json`` / ``.txt`` / ``.parquet`` file or a
      ``datasets`` directory saved with ``save_to_disk``; ``""`` is the Q/A
      records of the embedded demo corpus (``jlora/train/data/qa.jsonl``),
      a skill the shipped base model lacks.
    eval_path: held-out data in the same forms; ``""`` holds out
      ``eval_fraction`` of the training sequences instead.
    format: ``"text"`` (``text_field``), ``"instruction"`` (``prompt`` /
      ``completion``, or Alpaca's ``instruction`` / ``input`` / ``output``),
      ``"chat"`` (``messages`` of ``role`` / ``content``, or ShareGPT's
      ``conversations`` of ``from`` / ``value``; the tokenizer's chat template
      when it has one), or ``"auto"`` (per record).
    seq_len: tokens per training sequence.
    truncation: a record longer than ``seq_len``: ``"truncate"`` keeps its
      prompt and cuts the answer's tail (or, when the prompt alone is too
      long, the prompt's head), ``"drop"`` leaves it out, ``"split"`` cuts it
      into pieces (later pieces train without their prompt). The job says
      how many records were cut.
    packing: pack several records into one sequence (else one per row,
      padded); records stay whole unless ``truncation="split"``.
    tokenizer: ``""`` uses the model's (its checkpoint dir's tokenizer files
      for local models, bytes for presets); ``"bytes"`` forces the byte tokenizer.
    seed: shuffling seed (each epoch is a fresh deterministic permutation).
  """

  path: str = ""
  eval_path: str = ""
  format: Literal["auto", "text", "instruction", "chat"] = "auto"
  text_field: str = "text"
  seq_len: int = 128
  truncation: Literal["truncate", "drop", "split"] = "truncate"
  packing: bool = True
  eval_fraction: float = 0.1
  tokenizer: str = ""
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimSection:
  """AdamW with linear warmup then cosine decay, global-norm clipping and accumulation.

  ``loraplus_lr_ratio`` (e.g. 16) turns on LoRA+: B trains at that multiple of
  ``learning_rate`` and embedding adapters at ``loraplus_lr_embedding``.
  ``end_lr_ratio`` (in [0, 1]) is the final learning rate over the peak;
  ``b1`` and ``b2`` are Adam's decay rates (in [0, 1)); ``grad_clip`` is the
  global gradient norm clipped to, ``0`` turning clipping off (negative
  values are refused).
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
class MeshSection:
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
class CheckpointSection:
  """Orbax checkpoints under ``<output_dir>/checkpoints``: every N optimizer steps, keep the last K."""

  every: int = 50
  keep: int = 2
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class ReportSection:
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
