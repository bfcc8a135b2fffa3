"""Adapter configurations: frozen dataclasses with PEFT's field names.

The names match PEFT's ``LoraConfig`` so that an ``adapter_config.json`` maps
onto them 1:1 (see ``jlora.io``); fields PEFT has but jlora does not implement
are rejected there rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Literal, Mapping, Sequence

from flax.core import FrozenDict

InitLoraWeights = Literal[True, False, "gaussian"]
MixerInit = Literal["orthogonal", "kaiming"]


def _as_tuple(value):
  if value is None or isinstance(value, str):
    return value
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Plain LoRA: ``y = base(x) + dropout(x) @ A @ B * scaling``.

  Attributes:
    r: rank of the update.
    lora_alpha: scaling numerator; ``scaling = lora_alpha / r`` (or
      ``lora_alpha / sqrt(r)`` with ``use_rslora``).
    target_modules: module names matched as suffixes of the dotted module path
      (a sequence), a regex matched against the whole path (a string), or
      ``"all-linear"`` (every linear-like layer except the output head).
    exclude_modules: same forms as ``target_modules``; matches are skipped.
    lora_dropout: dropout rate on the adapter input (training mode only).
    use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    init_lora_weights: ``True`` (A Kaiming-uniform, B zero; embeddings the
      reverse), ``"gaussian"`` (A normal with std 1/r, as PEFT; B zero) or
      ``False`` (both random: a debugging aid whose output differs from the
      base model).
    rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``lora_alpha``,
      keyed by a regex that is searched (suffix-anchored) in the module path.
    layers_to_transform: only these layer indices get the adapter.
    layers_pattern: name of the layer container (e.g. ``"layers"``, ``"h"``)
      that ``layers_to_transform`` indexes.
    fan_in_fan_out: PEFT's flag for layers that store weights as [in, out]
      (GPT-2's Conv1D). Used by checkpoint I/O only.
    seed: PRNG seed for the adapter's initialisation and dropout.
  """

  r: int = 8
  lora_alpha: float = 8
  target_modules: Sequence[str] | str | None = None
  exclude_modules: Sequence[str] | str | None = None
  lora_dropout: float = 0.0
  use_rslora: bool = False
  init_lora_weights: InitLoraWeights = True
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=FrozenDict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=FrozenDict)
  layers_to_transform: Sequence[int] | int | None = None
  layers_pattern: Sequence[str] | str | None = None
  fan_in_fan_out: bool = False
  bias: Literal["none"] = "none"
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "target_modules", _as_tuple(self.target_modules))
    object.__setattr__(self, "exclude_modules", _as_tuple(self.exclude_modules))
    if _is_int(self.r):
      object.__setattr__(self, "r", int(self.r))  # numpy ints too (they don't go into JSON)
    layers = self.layers_to_transform
    if _is_int(layers):
      layers = (layers,)
    elif layers is not None and not isinstance(layers, str):
      layers = tuple(int(i) if _is_int(i) else i for i in layers)
    object.__setattr__(self, "layers_to_transform", layers)
    object.__setattr__(self, "layers_pattern", _as_tuple(self.layers_pattern))
    # FrozenDict keeps the config hashable, so it can live in a module's graphdef.
    object.__setattr__(self, "rank_pattern", FrozenDict(self.rank_pattern or {}))
    object.__setattr__(self, "alpha_pattern", FrozenDict(self.alpha_pattern or {}))
    self._validate()

  def _validate(self):
    _check_rank(self.r, "r")
    _check_alpha(self.lora_alpha, "lora_alpha")
    for pattern, rank in self.rank_pattern.items():
      _check_regex(pattern, "rank_pattern")
      _check_rank(rank, f"rank_pattern[{pattern!r}]")
    for pattern, alpha in self.alpha_pattern.items():
      _check_regex(pattern, "alpha_pattern")
      _check_alpha(alpha, f"alpha_pattern[{pattern!r}]")
    layers = self.layers_to_transform
    if layers is not None and (isinstance(layers, str) or not all(
        _is_int(i) and i >= 0 for i in layers)):
      raise ValueError(
          f"layers_to_transform must be a layer index or a list of them (ints >= 0), got {layers!r}."
      )
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
    if self.init_lora_weights not in (True, False, "gaussian"):
      raise ValueError(
          f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, "
          "False or 'gaussian'."
      )
    regex_target = isinstance(self.target_modules, str) and self.target_modules != "all-linear"
    if regex_target and (self.layers_to_transform is not None or self.layers_pattern is not None):
      raise ValueError(
          "layers_to_transform / layers_pattern cannot be used with a regex target_modules (as in "
          "PEFT); put the layer indices in the regex, e.g. r'.*\\.layers\\.(0|2)\\.self_attn\\.q_proj'."
      )
    if self.layers_pattern and self.layers_to_transform is None:
      raise ValueError("layers_pattern only applies with layers_to_transform; set both or neither.")
    if self.bias != "none":
      raise ValueError(f"bias={self.bias!r} is not supported; jlora adapters train no biases.")
    for name, pattern in (("target_modules", self.target_modules),
                          ("exclude_modules", self.exclude_modules)):
      if isinstance(pattern, str) and pattern != "all-linear":
        _check_regex(pattern, name)
      elif pattern is not None and not all(isinstance(p, str) for p in pattern):
        raise ValueError(
            f"{name} must be a regex string or a list of module-name strings, got {pattern!r}."
        )

  def rank_for(self, module_path: str) -> int:
    """The rank used for the module at ``module_path`` (dotted, PEFT-style)."""
    return _pattern_value(self.rank_pattern, module_path, self.r)

  def alpha_for(self, module_path: str) -> float:
    """The alpha used for the module at ``module_path``."""
    return _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)

  def scaling_for(self, module_path: str) -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for one module."""
    return lora_scaling(self.rank_for(module_path), self.alpha_for(module_path), self.use_rslora)


@dataclasses.dataclass(frozen=True)
class MoSLoraConfig(LoraConfig):
  """MoSLoRA: a learnable r×r mixer between A and B.

  ``delta = dropout(x) @ A @ M @ B * scaling``; ``r**2`` extra parameters per
  layer. ``mixer_init="orthogonal"`` draws M with ``MᵀM = I``;
  ``"kaiming"`` draws it Kaiming-uniform (PEFT's ``a=sqrt(5)`` convention,
  i.e. ``U(-1/sqrt(r), 1/sqrt(r))``). With B at zero the adapted model still
  equals the base model at init.
  """

  mixer_init: MixerInit = "kaiming"

  def _validate(self):
    super()._validate()
    if self.mixer_init not in ("orthogonal", "kaiming"):
      raise ValueError(
          f"mixer_init={self.mixer_init!r} is not supported; use 'orthogonal' or 'kaiming'."
      )


@dataclasses.dataclass(frozen=True)
class WLoraConfig:
  """WLoRA: a learnable, softmax-normalised mix of K frozen upstream LoRAs.

  Per target layer, ``delta(x) = sum_k softmax(w)_k * delta_k(x)`` where
  ``delta_k`` is upstream LoRA k (its own A, B and scaling, all frozen) and the
  logits ``w`` (K per layer) are the only trainable parameters. ``w`` starts at
  zero, i.e. equal weights 1/K.

  Attributes:
    upstream_loras: K >= 1 upstream adapters: names of adapters already in the
      model, or PEFT adapter directories (``jlora.get_peft_model`` loads those).
    target_modules: optional restriction; by default every layer that all
      upstreams adapt. The upstreams must adapt the same layers.
    seed: unused by the math (init is deterministic); kept for uniformity.
  """

  upstream_loras: Sequence[str] = ()
  target_modules: Sequence[str] | str | None = None
  seed: int = 0

  def __post_init__(self):
    upstreams = self.upstream_loras
    upstreams = (upstreams,) if isinstance(upstreams, str) else upstreams
    object.__setattr__(self, "upstream_loras", tuple(str(u) for u in upstreams))
    object.__setattr__(self, "target_modules", _as_tuple(self.target_modules))
    if not self.upstream_loras:
      raise ValueError(
          "WLoraConfig needs at least one upstream LoRA: pass upstream_loras=[name_or_dir, ...]."
      )
    if len(set(self.upstream_loras)) != len(self.upstream_loras):
      raise ValueError(f"WLoraConfig.upstream_loras has duplicates: {self.upstream_loras}.")


AdapterConfig = LoraConfig | WLoraConfig


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
  """``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
  return alpha / math.sqrt(r) if use_rslora else alpha / r


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_rank(rank, what: str) -> None:
  if not _is_int(rank) or rank < 1:
    raise ValueError(f"{what} must be a positive integer rank, got {rank!r}.")


def _check_alpha(alpha, what: str) -> None:
  if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
    raise ValueError(f"{what} must be a number, got {alpha!r}.")
  if not math.isfinite(alpha):
    raise ValueError(f"{what} must be a finite number, got {alpha!r} (e.g. 16); NaN and inf make every output NaN.")


def _check_regex(pattern, what: str) -> None:
  try:
    re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"{what} has {pattern!r}, which is not a valid regex: {e}") from e


def _pattern_value(patterns: dict, module_path: str, default):
  """PEFT's pattern lookup: the first key whose regex matches the path's end (after a dot)."""
  for pattern, value in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", module_path):
      return value
  return default
