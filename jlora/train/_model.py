"""The job's model side: base model, tokenizer and adapter, from ``TrainConfig``.

``cfg.model.name`` is a preset (``register_preset``; ``"tiny"`` ships with
jlora) or a local Hugging Face checkpoint directory, which
``jlora.io.from_pretrained`` loads. Models are called as
``model(input_ids [B, T], attention_mask=None) -> logits [B, T, V]``.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jlora.io import from_pretrained, get_peft_model
from jlora.models import LanguageModel, check_attention
from jlora.quant import quantize
from jlora.train._config import ModelSection
from jlora.train._presets import preset, presets, register_preset  # noqa: F401  (re-exported)


def load_model(cfg: ModelSection, mesh: Mesh | None = None):
  """``(model, model_dir or None)`` for a preset name or a local checkpoint directory.

  With a ``mesh`` a checkpoint is read shard by shard straight onto the
  devices (``from_pretrained(..., mesh=mesh)``): no process ever holds the
  whole model. Presets are built whole (they are small, random and local).
  """
  model, model_dir = _base_model(cfg, mesh)
  if isinstance(model, LanguageModel):
    model.remat = cfg.remat
    # "auto": rolled until the job's memory plan picks (jlora.train._memory_fit.job_scan_unroll)
    model.scan_unroll = 1 if cfg.scan_unroll == "auto" else cfg.scan_unroll
  set_attention(model, cfg.attention)
  return model, model_dir


def set_attention(model: nnx.Module, attention: str) -> None:
  """Select the attention kernel of a ``jlora.models`` model, checked against this backend.

  Raises ValueError (with the fix) for a kernel this backend cannot run, e.g.
  ``"splash"`` off TPU, so the job fails before anything compiles. Models
  that are not a ``jlora.models.LanguageModel`` (custom ones) keep their own attention.
  """
  check_attention(attention, for_backend=True)
  if isinstance(model, LanguageModel):
    model.attention = attention


def _base_model(cfg: ModelSection, mesh: Mesh | None):
  factory = preset(cfg.name)
  if factory is not None:
    model = factory(cfg)
    return (quantize(model, cfg.quantize) if cfg.quantize else model), None
  path = Path(cfg.name).expanduser()
  if path.is_dir() or path.is_file():  # a file gets from_pretrained's error: pass its directory
    return from_pretrained(str(path), dtype=getattr(jnp, cfg.dtype), mesh=mesh,
                           quantize=cfg.quantize or None), str(path)
  raise ValueError(
      f"model.name={cfg.name!r} is neither a preset ({', '.join(presets())}) nor a local "
      "checkpoint directory; download the model first (e.g. huggingface-cli download) and pass its path.")


def max_length(model: nnx.Module) -> int | None:
  """The longest sequence the model supports (``config.max_position_embeddings``), if it says."""
  config = getattr(model, "config", None)
  for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
    value = getattr(config, name, None) if config is not None else None
    if value is None:
      value = getattr(model, name, None)
    if isinstance(value, int):
      return value
  return None


def vocab_size(model: nnx.Module) -> int | None:
  config = getattr(model, "config", None)
  value = getattr(config, "vocab_size", None)
  return value if isinstance(value, int) else None


def check_tokenizer_fits(tokenizer, model: nnx.Module, fix: str) -> None:
  """ValueError (ending with ``fix``) when ``tokenizer`` has more ids than the model's vocabulary."""
  vocab = vocab_size(model)
  if vocab is not None and tokenizer.vocab_size > vocab:
    raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}; {fix}")


def add_adapter(model: nnx.Module, config, name: str = "default") -> nnx.Module:
  """Inject the job's adapter (its kind's config; WLoRA upstream directories are loaded too, as
  ``jlora.get_peft_model`` does)."""
  return get_peft_model(model, config, adapter_name=name)
