"""VeRA (Kopiczko et al., 2024; PEFT's ``VeraConfig``) as a registered adapter kind.

Every adapted Linear layer shares one pair of frozen random projections,
``vera_A [r, max_in]`` and ``vera_B [max_out, r]`` (PEFT's layout; the
largest in/out of the adapted layers), and trains two vectors of its own:
``delta(x) = λ_b ⊙ (B·(λ_d ⊙ (A·x)))`` with A, B the layer's slices
``vera_A[:, :in]``, ``vera_B[:out, :]``, ``λ_d [r]`` (``vera_lambda_d``,
``d_initial`` at init) and ``λ_b [out]`` (``vera_lambda_b``, zero at init, so
the model starts unchanged). In jlora's layouts a layer keeps its slices as
``vera_A [*stack, in, r]`` and ``vera_B [*stack, r, out]`` (frozen
``LoraBuffer``s). The update is a plain LoRA ``A' = A·diag(λ_d)``,
``B' = diag(λ_b)·B`` of rank r, so merging, the fused matmul, per-sample
routing and weighted combination work as for LoRA.

Checkpoints are PEFT's: ``<module>.vera_lambda_d`` / ``.vera_lambda_b`` per
module and ``base_model.vera_A`` / ``base_model.vera_B`` once, which is what
``save_projection=True`` (PEFT's default) writes. Fresh projections come from
``jax.random.key(projection_prng_key)``, not torch's generator, so a fresh
jlora VeRA adapter and a fresh PEFT one of the same key differ; loading
reads the checkpoint's projections, so a loaded adapter matches PEFT exactly.
That is also why jlora always saves the projections (``save_projection=False``
is refused: PEFT would rebuild torch's projections, not the ones trained with).

Everything here goes through ``jlora.register_adapter_kind``; nothing else in
jlora knows about VeRA.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.nn import AdapterModule, LoraBuffer, LoraParam, PeftFormat, check_peft_fields
from jlora.nn import register_adapter_kind

PREFIX = "base_model."
SHARED = {"vera_A": f"{PREFIX}vera_A", "vera_B": f"{PREFIX}vera_B"}


def _as_tuple(value):
  if value is None or isinstance(value, str):
    return value
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class VeraConfig:
  """VeRA, with PEFT's ``VeraConfig`` field names and defaults.

  Attributes:
    r: rank of the shared projections (PEFT's default 256; VeRA wants it large).
    target_modules / exclude_modules / layers_to_transform / layers_pattern:
      as ``LoraConfig``; Linear layers only (as PEFT).
    projection_prng_key: seed of the shared projections (a JAX key; see the
      module doc for how they differ from torch's).
    save_projection: must be True (jlora always writes the projections).
    vera_dropout: dropout rate on the adapter input (training mode only).
    d_initial: initial value of every ``λ_d``.
    init_weights: True: ``λ_b = 0`` (the model starts unchanged), ``λ_d =
      d_initial``; False: ``λ_b = 1``, ``λ_d`` standard normal (a debugging aid).
    fan_in_fan_out: PEFT's flag for GPT-2's Conv1D; checkpoint I/O only.
    modules_to_save: as ``LoraConfig``.
    seed: PRNG seed of ``init_weights=False`` and dropout.
  """

  r: int = 256
  target_modules: Sequence[str] | str | None = None
  exclude_modules: Sequence[str] | str | None = None
  projection_prng_key: int = 0
  save_projection: bool = True
  vera_dropout: float = 0.0
  d_initial: float = 0.1
  fan_in_fan_out: bool = False
  bias: str = "none"
  modules_to_save: Sequence[str] | None = None
  init_weights: bool = True
  layers_to_transform: Sequence[int] | int | None = None
  layers_pattern: Sequence[str] | str | None = None
  seed: int = 0

  def __post_init__(self):
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
      object.__setattr__(self, name, _as_tuple(getattr(self, name)))
    modules = self.modules_to_save
    object.__setattr__(self, "modules_to_save", (modules,) if isinstance(modules, str) else _as_tuple(modules))
    layers = self.layers_to_transform
    object.__setattr__(self, "layers_to_transform", (layers,) if isinstance(layers, int) else _as_tuple(layers))
    if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
      raise ValueError(f"VeraConfig.r must be a positive integer, got {self.r!r}.")
    object.__setattr__(self, "r", int(self.r))
    if not self.save_projection:
      raise ValueError(
          "VeraConfig(save_projection=False) is not supported: jlora's projections come from JAX's PRNG, "
          "so PEFT could not rebuild them from projection_prng_key; keep save_projection=True (PEFT's default).")
    if not 0.0 <= self.vera_dropout < 1.0:
      raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout}.")
    if not (isinstance(self.d_initial, numbers.Real) and math.isfinite(self.d_initial)):
      raise ValueError(f"d_initial must be a finite number, got {self.d_initial!r}.")
    if self.bias != "none":
      raise ValueError(f"bias={self.bias!r} is not supported; jlora adapters train no biases.")
    if self.layers_pattern and self.layers_to_transform is None:
      raise ValueError("layers_pattern only applies with layers_to_transform; set both or neither.")

  def rank_for(self, module_path: str) -> int:
    return self.r

  def scaling_for(self, module_path: str) -> float:
    return 1.0


class VeraAdapter(AdapterModule):
  """One layer's VeRA adapter (shapes in the module doc; ``scaling [*stack]`` is 1, or 0 where
  ``layers_to_transform`` leaves a stacked layer out)."""

  def __init__(self, vera_A, vera_B, lambda_d, lambda_b, live, *, dropout: float = 0.0, dropout_key=None):
    self.vera_A = LoraBuffer(jnp.asarray(vera_A, jnp.float32))
    self.vera_B = LoraBuffer(jnp.asarray(vera_B, jnp.float32))
    self.vera_lambda_d = LoraParam(jnp.asarray(lambda_d, jnp.float32))
    self.vera_lambda_b = LoraParam(jnp.asarray(lambda_b, jnp.float32))
    self.scaling = LoraBuffer(jnp.asarray(live, jnp.float32))
    self.init_dropout(dropout, dropout_key, self.scaling.shape)

  @property
  def rank(self) -> int:
    return self.vera_A.shape[-1]

  def live_ranks(self) -> np.ndarray:
    return np.where(np.ravel(np.asarray(self.scaling[...])) != 0, self.rank, 0).astype(np.int64)

  def delta(self, ops, x, dtype, *, dropout: bool = True):
    if dropout:
      x = self.apply_dropout(x)
    h = ops.project_in(x, self.vera_A[...].astype(dtype)) * self.vera_lambda_d[...].astype(dtype)
    y = ops.project_out(h, self.vera_B[...].astype(dtype)) * self.vera_lambda_b[...].astype(dtype)
    return y * self.scaling[...].astype(dtype)

  def lora_factors(self, ops):
    """``A' = A·diag(λ_d)`` ``[*stack, in, r]``, ``B' = diag(λ_b)``-scaled B ``[*stack, r, out]``."""
    a = self.vera_A[...] * self.vera_lambda_d[...][..., None, :]
    b = self.vera_B[...] * self.vera_lambda_b[...][..., None, :]
    return a, b, self.scaling[...]


def projections(key: int, r: int, max_in: int, max_out: int) -> tuple[jax.Array, jax.Array]:
  """PEFT-shaped shared projections ``vera_A [r, max_in]``, ``vera_B [max_out, r]``, Kaiming-uniform
  as PEFT's ``_kaiming_init`` (bound ``sqrt(6 / fan_in)``), drawn from a JAX key."""
  key_a, key_b = jax.random.split(jax.random.key(key))
  bound_a, bound_b = math.sqrt(6.0 / max_in), math.sqrt(6.0 / r)
  return (jax.random.uniform(key_a, (r, max_in), jnp.float32, -bound_a, bound_a),
          jax.random.uniform(key_b, (max_out, r), jnp.float32, -bound_b, bound_b))


def _in_out(layer) -> tuple[int, int]:
  """``(in, out)`` of a layer VeRA can adapt; a clear error for any other."""
  (a_shape, b_shape) = layer.factor_shapes(1)
  if len(a_shape) != 2 or len(b_shape) != 2 or layer.b_rank_axis != 0 or not layer.linear_like:
    raise ValueError(
        f"VeRA adapts Linear layers only (as PEFT), but {layer.module_names[0]} is a "
        f"{type(layer).__name__}; leave it out of target_modules.")
  return a_shape[0], b_shape[1]


def build_vera(layer, key, ranks, scalings, config: VeraConfig, *, targets) -> VeraAdapter:
  """A fresh VeRA adapter for ``layer``: its slices of the projections shared by ``targets``."""
  sizes = [_in_out(t) for t in targets]
  n_in, n_out = _in_out(layer)
  full_a, full_b = projections(config.projection_prng_key, config.r, max(i for i, _ in sizes),
                               max(o for _, o in sizes))
  stack = tuple(layer.stack_shape)
  tile = lambda x: jnp.broadcast_to(x, stack + x.shape)
  key_d, key_dropout = jax.random.split(key)
  if config.init_weights:
    lambda_d = jnp.full(stack + (config.r,), config.d_initial, jnp.float32)
    lambda_b = jnp.zeros(stack + (n_out,), jnp.float32)
  else:
    lambda_d = jax.random.normal(key_d, stack + (config.r,), jnp.float32)
    lambda_b = jnp.ones(stack + (n_out,), jnp.float32)
  live = np.reshape((np.asarray(ranks) > 0).astype(np.float32), stack)
  dropout = config.vera_dropout if layer.supports_dropout() else 0.0
  return VeraAdapter(tile(full_a[:, :n_in].T), tile(full_b[:n_out, :].T), lambda_d, lambda_b, live,
                     dropout=dropout, dropout_key=key_dropout)


# ---- PEFT's VeraConfig and tensors ---------------------------------------------------------

MAPPED = ("r", "target_modules", "exclude_modules", "projection_prng_key", "save_projection", "vera_dropout",
          "d_initial", "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform",
          "layers_pattern")
IGNORED = ("peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
           "peft_version")


def config_from_peft(raw: dict) -> VeraConfig:
  check_peft_fields(raw, MAPPED, IGNORED, {})
  kwargs = {key: raw[key] for key in MAPPED if raw.get(key) is not None}
  if not raw.get("save_projection", True):
    raise ValueError("save_projection=false: PEFT rebuilds VeRA's projections with torch's generator, which "
                     "jlora cannot reproduce; save the adapter with save_projection=True (PEFT's default).")
  if isinstance(kwargs.get("target_modules"), list):
    kwargs["target_modules"] = tuple(sorted(kwargs["target_modules"]))
  if kwargs.get("target_modules") is None:
    raise ValueError("target_modules is missing; the config must name the adapted modules.")
  return VeraConfig(**kwargs)


def config_to_peft(config: VeraConfig, target_modules, ranks, fan_in_fan_out: bool) -> dict:
  return {
      "peft_type": "VERA", "task_type": None, "base_model_name_or_path": None, "revision": None,
      "inference_mode": True, "r": config.r, "target_modules": sorted(target_modules),
      "projection_prng_key": int(config.projection_prng_key), "save_projection": True,
      "vera_dropout": float(config.vera_dropout), "d_initial": float(config.d_initial),
      "fan_in_fan_out": bool(fan_in_fan_out), "bias": "none",
      "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
      "init_weights": bool(config.init_weights), "layers_to_transform": None, "layers_pattern": None,
  }


def _first(x: np.ndarray, stack_ndim: int) -> np.ndarray:
  """One layer's slice (every stacked layer holds the same one)."""
  return x.reshape((-1,) + x.shape[stack_ndim:])[0]


def shared_to_peft(pairs, config: VeraConfig) -> dict:
  """``base_model.vera_A [r, max_in]`` and ``vera_B [max_out, r]`` from the layers' slices."""
  slices = [(_first(np.asarray(ad.vera_A[...]), len(l.stack_shape)),
             _first(np.asarray(ad.vera_B[...]), len(l.stack_shape))) for l, ad in pairs]
  widest_a = max((a for a, _ in slices), key=lambda a: a.shape[0])
  widest_b = max((b for _, b in slices), key=lambda b: b.shape[1])
  return {SHARED["vera_A"]: np.ascontiguousarray(widest_a.T), SHARED["vera_B"]: np.ascontiguousarray(widest_b.T)}


def shared_from_peft(pairs, tensors: dict, config: VeraConfig) -> list:
  """Each layer's projection slices from PEFT's shared ``vera_A`` / ``vera_B`` (consumed from ``tensors``)."""
  absent = [k for k in SHARED.values() if k not in tensors]
  if absent:
    raise ValueError(f"lacks VeRA's shared projections {absent}; PEFT writes them with save_projection=True "
                     "(its default); re-save the adapter that way.")
  full_a, full_b = (np.asarray(tensors.pop(SHARED[k]), np.float32) for k in ("vera_A", "vera_B"))
  writes = []
  for layer, adapter in pairs:
    n_in, n_out = _in_out(layer)
    if full_a.shape[0] != adapter.rank or full_a.shape[1] < n_in or full_b.shape[0] < n_out:
      raise ValueError(f"VeRA projections vera_A{full_a.shape} / vera_B{full_b.shape} do not cover "
                       f"{layer.module_names[0]} (in {n_in}, out {n_out}, r {adapter.rank}).")
    stack = tuple(layer.stack_shape)
    writes.append((adapter.vera_A, np.broadcast_to(full_a[:, :n_in].T, stack + (n_in, adapter.rank))))
    writes.append((adapter.vera_B, np.broadcast_to(full_b[:n_out, :].T, stack + (adapter.rank, n_out))))
  return writes


VERA = register_adapter_kind(
    "VeRA", VeraConfig, VeraAdapter, build=build_vera,
    roles={"vera_A": "projection", "vera_B": "projection", "vera_lambda_d": "vector", "vera_lambda_b": "vector"},
    peft=PeftFormat("VERA", config_to_peft, config_from_peft,
                    tensors={"vera_lambda_d": "vera_lambda_d", "vera_lambda_b": "vera_lambda_b"},
                    shared_to_peft=shared_to_peft, shared_from_peft=shared_from_peft))
