"""``TrainConfig``: one frozen dataclass for the whole job, from defaults, YAML and ``--set``.

Every field has a default that works, so ``TrainConfig()`` is the embedded demo
job. ``load_config(path, overrides)`` reads a YAML file of nested mappings
(``model: {name: ...}``) and applies ``"section.key=value"`` overrides; values
are parsed as YAML scalars and type-checked against the field annotations.
Unknown keys and wrong types raise ``ConfigError`` naming the key. The
sections live in ``_config_sections``, the parsing in ``_config_parse``; this
module adds the values no type can check (ranges, combinations).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

from jlora._deprecation import deprecated_names
from jlora.train._config_parse import ConfigError, from_dict, merge_overrides, parse_overrides, read_mapping, to_plain
from jlora.train._config_sections import (  # noqa: F401  (the sections are re-exported)
    DEMO_TARGETS, CheckpointSection, DataSection, MeshSection, ModelSection, OptimSection, ReportSection,
    adapter_field, adapter_kind, adapter_section)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The whole training job. ``TrainConfig()`` is the demo: a LoRA that teaches the shipped base
  (``byte-stories``) the embedded Q/A records, about 2 minutes on 2 CPU cores.

  Attributes:
    adapter: the adapter kind's own config (``jlora.LoraConfig``,
      ``MoSLoraConfig`` or ``WLoraConfig``; ``adapter_section(kind, ...)``
      builds one over the job's defaults); in YAML ``adapter: {kind: lora,
      r: 16, ...}`` with every field of that config as a key.
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
    compile_cache: where compiled steps and GPU autotuning results are kept
      for the next start (``jlora.train.enable_compile_cache``): ``"auto"``
      (default) a per-device-kind directory under ``~/.cache/jlora/compile``
      on a GPU or TPU, nothing on CPU; a directory path; ``"none"`` (off).
  """

  model: ModelSection = ModelSection()
  adapter: Any = adapter_field()
  data: DataSection = DataSection()
  optim: OptimSection = OptimSection()
  mesh: MeshSection = MeshSection()
  checkpoint: CheckpointSection = CheckpointSection()
  report: ReportSection = ReportSection()
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
  compile_cache: str = "auto"

  def __post_init__(self):
    _check_values(self)

  def to_dict(self) -> dict:
    """Nested plain dict (YAML/JSON-ready; tuples become lists; the adapter as ``{kind, <fields>}``)."""
    plain = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if "plain" in f.metadata:
        plain[f.name] = f.metadata["plain"](value)
      else:
        plain[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return to_plain(plain)

  def replace(self, **overrides: Any) -> "TrainConfig":
    """A copy with dotted-key overrides: ``cfg.replace(**{"optim.learning_rate": 1e-3})``.

    Another ``adapter.kind`` starts the adapter section afresh from that kind's
    defaults (the other adapter keys given here apply on top).
    """
    values = self.to_dict()
    if overrides.get("adapter.kind", values["adapter"]["kind"]) != values["adapter"]["kind"]:
      values["adapter"] = {}
    return from_dict(merge_overrides(values, overrides, flat=True), TrainConfig)


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
  for key, allowed in RANGES.items():
    value = _value(cfg, key)
    if isinstance(value, (int, float)) and not _within(value, allowed):  # None / "auto": not a number to check
      raise ConfigError(f"{key} must be {allowed}{_RANGE_NOTES.get(key, '')}, got {value}.")
  adapter_kind(cfg.adapter)  # a kind config given in code: one the job knows


# The allowed values of every numeric field outside the adapter section (whose values jlora's adapter configs
# check: LoraConfig and the rest). The text is the message's.
RANGES = {
    "steps": ">= 1", "batch_size": ">= 1", "eval_every": ">= 1", "eval_batches": ">= 0", "log_every": ">= 1",
    "loss_chunk_tokens": ">= 0", "samples": ">= 0", "seed": ">= 0",
    "model.seed": ">= 0", "model.scan_unroll": ">= 1",
    "data.seq_len": ">= 2", "data.eval_fraction": "in [0, 1)", "data.seed": ">= 0",
    "optim.learning_rate": "> 0", "optim.warmup_steps": ">= 0", "optim.end_lr_ratio": "in [0, 1]",
    "optim.weight_decay": ">= 0", "optim.b1": "in [0, 1)", "optim.b2": "in [0, 1)", "optim.grad_clip": ">= 0",
    "optim.grad_accum": ">= 1", "optim.loraplus_lr_ratio": "> 0", "optim.loraplus_lr_embedding": "> 0",
    "mesh.data": ">= 1 or -1", "mesh.fsdp": ">= 1 or -1", "mesh.tensor": ">= 1", "mesh.device_memory_gib": ">= 0",
    "checkpoint.every": ">= 1", "checkpoint.keep": ">= 1",
}
_RANGE_NOTES = {
    "data.seq_len": " (a token and the next one it predicts)",
    "optim.end_lr_ratio": " (the final learning rate over the peak)",
    "optim.grad_clip": " (0 turns clipping off)",
    "optim.loraplus_lr_ratio": " (PEFT suggests 16) or null (off)",
    "mesh.data": " (-1: all remaining devices)",
    "mesh.fsdp": " (-1: the smallest that fits)",
    "mesh.device_memory_gib": " (0: read it from the device)",
}


def _value(cfg: TrainConfig, key: str):
  for name in key.split("."):
    cfg = getattr(cfg, name)
  return cfg


def _within(value: float, allowed: str) -> bool:
  """Whether ``value`` is in a range written as in ``RANGES``: ``>= a``, ``> a``, ``in [a, b)`` / ``[a, b]``, ``... or v``."""
  allowed, _, alternative = allowed.partition(" or ")
  if alternative and value == float(alternative):
    return True
  if allowed.startswith("in "):
    low, high = (float(x) for x in allowed[4:-1].split(","))
    return low <= value and (value <= high if allowed.endswith("]") else value < high)
  op, bound = allowed.split()
  return value >= float(bound) if op == ">=" else value > float(bound)


def _default(key: str):
  node = TrainConfig()
  for part in key.split("."):
    node = getattr(node, part)
  return node


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
  """``TrainConfig`` from an optional YAML file plus ``"a.b=value"`` overrides."""
  values = {} if path is None else read_mapping(path)
  return from_dict(merge_overrides(values, parse_overrides(overrides), flat=True), TrainConfig)


# The sections' names before they were ``*Section`` (``ModelConfig`` is the architecture in jlora.models).
RENAMED = {
    "ModelConfig": ("jlora.train.ModelSection", ModelSection),
    "AdapterConfig": ("jlora.train.adapter_section (the section is the adapter kind's own config)",
                      adapter_section),
    "DataConfig": ("jlora.train.DataSection", DataSection),
    "OptimConfig": ("jlora.train.OptimSection", OptimSection),
    "MeshConfig": ("jlora.train.MeshSection", MeshSection),
    "CheckpointConfig": ("jlora.train.CheckpointSection", CheckpointSection),
    "ReportConfig": ("jlora.train.ReportSection", ReportSection),
}
__getattr__ = deprecated_names(__name__, RENAMED)
