"""``LoraLayer``: the wrapper that adds adapters to one base layer.

A LoRA layer type is a small subclass that says how x meets the factors
(``project_in`` / ``project_out``) and how the factors form a kernel-shaped
update (``factors_to_weight``). Everything else (several adapters, activation,
per-sample routing, merging, scanned/stacked weights) lives here once.
Register a subclass for a base layer type with ``register_lora_layer``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.nn import _init
from jlora.nn._adapters import Adapter, LoraAdapter, WLoraAdapter, delta_weight
from jlora.nn._dora import DoraAdapter, along_output, column_norm
from jlora.nn._variables import LoraBuffer, LoraParam


class LoraLayer(nnx.Module):
  """A base layer plus named adapters whose outputs add to the base output.

  Subclasses implement the layer-type math below; shapes there are for one
  (unstacked) layer, with the rank ``r`` as the last axis of A and of
  ``project_in``'s output.

  Attributes:
    base_layer: the wrapped, frozen module (its params stay ``nnx.Param``).
    adapters: adapter name -> ``LoraAdapter`` / ``WLoraAdapter``.
    module_names: PEFT-style dotted name of each stacked layer (one name when
      the base layer is not stacked), used for patterns and checkpoint keys.
    active_adapters: names whose deltas are added in the forward pass.
    merged_adapters: names currently folded into the base kernel.
    disabled: when True the layer computes the base output only.
  """

  linear_like: ClassVar[bool] = True
  """Whether ``target_modules="all-linear"`` selects this layer type."""
  embedding_init: ClassVar[bool] = False
  """Use PEFT's embedding init (A zero, B normal) instead of A random, B zero."""
  b_rank_axis: ClassVar[int] = 0
  """Axis of the rank in (unstacked) B."""
  supports_dora: ClassVar[bool] = False
  """Whether DoRA applies: the kernel's last axis is the only output axis (Linear, Embed, Conv)."""

  def __init__(self, base_layer: nnx.Module, module_names: Sequence[str]):
    self.base_layer = base_layer
    self.adapters = nnx.Dict()
    self.module_names = tuple(module_names)
    self.active_adapters: tuple[str, ...] = ()
    self.merged_adapters: tuple[str, ...] = ()
    self.disabled = False
    # nnx.data: per_sample_adapters later puts a LoraBuffer here, so the slot must be data.
    self.routing: LoraBuffer | None = nnx.data(None)
    self.routing_names: tuple[str, ...] = ()
    self.check_base_layer()
    if len(self.module_names) != max(1, math.prod(self.stack_shape)):
      raise ValueError(
          f"{type(self).__name__}: got {len(self.module_names)} module names for a stack of "
          f"shape {self.stack_shape}."
      )

  # ---- layer-type math: override in subclasses ---------------------------

  def check_base_layer(self) -> None:
    """Raise a clear error if this base layer's configuration is unsupported."""

  @classmethod
  def base_kernel(cls, base: nnx.Module) -> nnx.Variable:
    """The variable of ``base`` that merging updates."""
    return base.kernel

  @classmethod
  def kernel_ndim(cls, base: nnx.Module) -> int:
    """Rank of one (unstacked) kernel of ``base``."""
    raise TypeError(f"{cls.__name__} must define kernel_ndim()")

  @classmethod
  def stack_shape_of(cls, base: nnx.Module) -> tuple[int, ...]:
    """Leading dims of ``base``'s kernel beyond one layer's (scanned layers)."""
    shape = cls.base_kernel(base).shape
    return tuple(shape[: len(shape) - cls.kernel_ndim(base)])

  def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (A, B) for one layer at the given rank."""
    raise TypeError(f"{type(self).__name__} must define factor_shapes()")

  def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
    """``x`` through A: ``[..., r]``."""
    raise TypeError(f"{type(self).__name__} must define project_in()")

  def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
    """``h [..., r]`` through B: shaped like the base layer's output."""
    raise TypeError(f"{type(self).__name__} must define project_out()")

  def factors_to_weight(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """The kernel-shaped product of A and B (one layer, no scaling)."""
    raise TypeError(f"{type(self).__name__} must define factors_to_weight()")

  def fan_in(self, a_shape: tuple[int, ...]) -> int:
    """Fan-in used for A's Kaiming init: everything A contracts."""
    return math.prod(a_shape[:-1])

  def svd_compatible(self) -> bool:
    """Whether ``A·B`` is a plain tensordot over the rank (B's rank axis first).

    ``add_weighted_adapter(..., "svd")`` needs this to see an update as an
    ``[A dims, B dims]`` matrix; the kernel's own layout does not matter.
    """
    return self.b_rank_axis == 0

  def adapter_input(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    """What the adapters see, given the base layer's call arguments."""
    return x

  # ---- generic machinery --------------------------------------------------

  def kernel(self) -> nnx.Variable:
    return self.base_kernel(self.base_layer)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.stack_shape_of(self.base_layer)

  def new_lora_adapter(
      self,
      key: jax.Array,
      ranks: Sequence[int],
      scalings: Sequence[float],
      *,
      init_lora_weights=True,
      mixer_init: str | None = None,
      use_dora: bool = False,
      dropout: float = 0.0,
      param_type: type[LoraParam] = LoraParam,
      dtype=jnp.float32,
  ) -> LoraAdapter:
    """A freshly initialised adapter for this layer.

    Args:
      key: PRNG key for the factors, mixer and dropout.
      ranks: rank of each stacked layer (``len == prod(stack_shape)`` or 1);
        0 leaves that layer without an update.
      scalings: scaling of each stacked layer, same length.
      init_lora_weights: ``LoraConfig.init_lora_weights``.
      mixer_init: ``"orthogonal"`` / ``"kaiming"`` for MoSLoRA, None for LoRA.
      use_dora: a ``DoraAdapter`` (magnitudes from the current kernel).
    """
    stack = self.stack_shape
    ranks = np.broadcast_to(np.asarray(ranks, np.int32), (max(1, math.prod(stack)),))
    max_rank = int(ranks.max())
    if max_rank < 1:
      raise ValueError(f"{self.module_names[0]}: an adapter needs a positive rank.")
    a_shape, b_shape = self.factor_shapes(max_rank)
    key_factors, key_mixer, key_dropout = jax.random.split(key, 3)
    scaling = np.broadcast_to(np.asarray(scalings, np.float32), ranks.shape).reshape(stack)
    if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian" and not self.embedding_init:
      a, b = self._matrix_init(key_factors, init_lora_weights, max_rank, scaling, a_shape, b_shape, dtype)
    else:  # embeddings take their own init for every string mode, as in PEFT
      a, b = _init.lora_factors(
          key_factors, stack + a_shape, stack + b_shape, self.fan_in(a_shape),
          init_lora_weights, dtype, embedding=self.embedding_init)
    rank_mask = None
    if (ranks != max_rank).any():
      rank_mask = (np.arange(max_rank)[None, :] < ranks[:, None]).astype(np.float32)
      rank_mask = jnp.asarray(rank_mask.reshape(stack + (max_rank,)))
      a = a * rank_mask.reshape(stack + (1,) * (len(a_shape) - 1) + (max_rank,)).astype(dtype)
      rank_in_b = tuple(max_rank if i == self.b_rank_axis else 1 for i in range(len(b_shape)))
      b = b * rank_mask.reshape(stack + rank_in_b).astype(dtype)
      if init_lora_weights == "gaussian" and not self.embedding_init:
        # A with std 1/r for each stacked layer's own r, not the stack's largest one.
        per_layer = (max_rank / np.maximum(ranks, 1)).astype(np.float32)
        a = a * jnp.asarray(per_layer.reshape(stack + (1,) * len(a_shape))).astype(dtype)
    mixer = None
    if mixer_init == "orthogonal":
      mixer = _init.orthogonal(key_mixer, stack + (max_rank, max_rank), dtype)
    elif mixer_init == "kaiming":
      mixer = _init.kaiming_uniform(key_mixer, stack + (max_rank, max_rank), max_rank, dtype)
    elif mixer_init is not None:
      raise ValueError(f"Unknown mixer_init {mixer_init!r}; use 'orthogonal' or 'kaiming'.")
    kwargs = dict(rank_mask=rank_mask, mixer=mixer, dropout=dropout if self.supports_dropout() else 0.0,
                  dropout_key=key_dropout, param_type=param_type)
    if not use_dora:
      return LoraAdapter(a, b, jnp.asarray(scaling), **kwargs)
    self._require_dense_kernel("use_dora=True")
    if not self.supports_dora:
      raise ValueError(
          f"use_dora=True: DoRA applies to Linear, Embed and Conv layers (as in PEFT), but "
          f"{self.module_names[0]} is a {type(self).__name__}; leave it out of target_modules.")
    adapter = DoraAdapter(a, b, jnp.asarray(scaling), jnp.zeros(stack + self.kernel().shape[-1:]), **kwargs)
    # PiSSA/OLoRA then move s·A·B out of the kernel, so their W_res + s·A·B is today's kernel.
    delta = 0.0 if _init.rewrites_base(init_lora_weights) else delta_weight(adapter, self)
    weight = jnp.asarray(self.kernel()[...], jnp.float32) + delta
    adapter.lora_magnitude_vector[...] = column_norm(weight, len(stack))
    return adapter

  def _matrix_init(self, key, mode: str, rank: int, scaling: np.ndarray, a_shape, b_shape, dtype):
    """PiSSA / OLoRA / orthogonal factors ``(A, B)`` for every stacked layer, from the kernel.

    Each layer's kernel is seen as PEFT's weight ``W [out, in]``; stacked
    layers with scaling 0 (left out by ``layers_to_transform``) get zeros.
    """
    if not (self.linear_like and self.svd_compatible()):
      raise ValueError(
          f"init_lora_weights={mode!r} applies to linear layers only (PEFT computes it from a "
          f"[out, in] weight), but {self.module_names[0]} is a {type(self).__name__}; leave this "
          "module out of target_modules or use init_lora_weights=True.")
    if mode != "orthogonal":
      self._require_dense_kernel(f"init_lora_weights={mode!r}")
    stack = self.stack_shape
    fan_in, fan_out = math.prod(a_shape[:-1]), math.prod(b_shape[1:])
    if mode != "orthogonal" and rank > min(fan_in, fan_out):
      raise ValueError(
          f"init_lora_weights={mode!r} takes the top r components of {self.module_names[0]}'s "
          f"[{fan_out}, {fan_in}] weight, so r must be <= {min(fan_in, fan_out)}, got {rank}; lower "
          "r (or its rank_pattern entry).")
    kernel = jnp.asarray(self.kernel()[...], jnp.float32).reshape((-1, fan_in, fan_out))
    flat_scaling = jnp.asarray(scaling.reshape(-1))
    keys = jax.random.split(key, kernel.shape[0])

    def one(k, weight_t, s):
      live = s != 0
      s = jnp.where(live, s, 1.0)
      if mode == "olora":
        a, b = _init.olora(weight_t.T, rank)
      elif mode == "orthogonal":
        a, b = _init.orthogonal_factors(k, fan_in, fan_out, rank)
      else:
        niter = None if mode == "pissa" else int(mode.removeprefix("pissa_niter_"))
        a, b = _init.pissa(weight_t.T, rank, s, niter=niter, key=k)
      return jnp.where(live, a, 0.0), jnp.where(live, b, 0.0)

    a, b = jax.vmap(one)(keys, kernel, flat_scaling)
    return (a.reshape(stack + a_shape).astype(dtype), b.reshape(stack + b_shape).astype(dtype))

  def _require_dense_kernel(self, option: str) -> None:
    """Raise unless the base kernel is a plain float parameter (PiSSA, OLoRA and DoRA read it)."""
    if not isinstance(self.kernel(), nnx.Param):
      raise ValueError(
          f"{option} reads the base weight of {self.module_names[0]}, which is stored quantized "
          f"({type(self.kernel()).__name__}); PEFT asks for a float32/16/bf16 weight too. Call "
          "jlora.dequantize(model) before adding the adapter (and quantize the result again "
          "afterwards if you like).")

  def supports_dropout(self) -> bool:
    """Dropout applies to real-valued inputs; embeddings take ids."""
    return not self.embedding_init

  def check_factors(self, name: str, a: jax.Array, b: jax.Array) -> None:
    """Raise if (A, B) do not fit this layer (stack dims included)."""
    rank = a.shape[-1]
    a_shape, b_shape = self.factor_shapes(rank)
    want = (self.stack_shape + a_shape, self.stack_shape + b_shape)
    if (tuple(a.shape), tuple(b.shape)) != want:
      raise ValueError(
          f"Adapter {name!r} at {self.module_names[0]}: factor shapes A{tuple(a.shape)}, "
          f"B{tuple(b.shape)} do not fit this layer, which needs A{want[0]}, B{want[1]} "
          f"for rank {rank}."
      )

  def add(self, name: str, adapter: Adapter) -> None:
    """Attach an adapter under ``name`` (inactive until activated)."""
    if name in self.adapters:
      raise ValueError(f"{self.module_names[0]} already has an adapter named {name!r}.")
    if isinstance(adapter, LoraAdapter):
      self.check_factors(name, adapter.lora_A[...], adapter.lora_B[...])
    self.adapters[name] = adapter

  def remove(self, name: str) -> None:
    if name in self.merged_adapters:
      raise ValueError(f"Adapter {name!r} is merged; unmerge it before deleting it.")
    del self.adapters[name]
    self.active_adapters = tuple(n for n in self.active_adapters if n != name)

  @classmethod
  def shared_projections(cls, layers: Sequence[nnx.Module], x: jax.Array) -> tuple[jax.Array, ...] | None:
    """Outputs of sibling ``layers`` (this type among them) that all read ``x``, computed together.

    ``jlora.nn.lora_projections`` asks each LoRA layer type in a group; a
    type whose base layers can share work on one input (e.g. a quantized base
    that casts ``x`` to fp8 once for all of them) returns every output
    (adapters included, via ``with_adapters``); None lets the caller call
    each layer on its own.
    """
    return None

  def __call__(self, x, *args, **kwargs):
    return self.with_adapters(self.base_layer(x, *args, **kwargs), x, *args, **kwargs)

  def with_adapters(self, y, x, *args, **kwargs):
    """The base output ``y`` plus the active adapters' deltas on the layer input ``x``."""
    if self.disabled:
      return y
    x = self.adapter_input(x, *args, **kwargs)
    if self.routing is not None:
      return y + self._routed_delta(x, y.dtype)
    for name in self.active_adapters:
      if name in self.adapters and name not in self.merged_adapters:
        adapter = self.adapters[name]
        if isinstance(adapter, DoraAdapter):  # as PEFT, on the output so far (other adapters in it)
          y = y + adapter.dora_delta(self, x, y, *args, **kwargs).astype(y.dtype)
        else:
          y = y + adapter.delta(self, x, y.dtype).astype(y.dtype)
    return y

  def _routed_delta(self, x, dtype):
    """Per-sample adapters: row i of the batch uses ``routing[i]``'s adapter (a one-hot row; all
    zeros for the base model).

    Every routed adapter's factors are folded to plain LoRA (``lora_factors``),
    padded to one rank, scaled into A and stacked with an all-zero adapter for
    base rows; each row then gathers its own ``A``, ``B`` and the delta is one
    batched ``x·A`` and one batched ``h·B`` over the rows (punica / S-LoRA
    style), whatever the number of adapters.
    """
    weights = self.routing[...]
    if x.shape[:1] != weights.shape[:1]:
      raise ValueError(
          f"per_sample_adapters got {weights.shape[0]} adapter names but {self.module_names[0]} "
          f"sees a batch of {x.shape[0] if x.ndim else 'none'}; pass one name per batch row."
      )
    present = [j for j, name in enumerate(self.routing_names) if name in self.adapters]
    if not present:
      return jnp.zeros((), dtype)
    adapters = [self.adapters[self.routing_names[j]] for j in present]
    if any(dropout_active(adapter) for adapter in adapters):
      return self._looped_delta(x, weights, dtype)
    factors = [adapter.lora_factors(self) for adapter in adapters]
    rank = max(a.shape[-1] for a, _, _ in factors)
    a_all = jnp.stack([_pad_axis(a * s.astype(a.dtype), -1, rank) for a, _, s in factors]
                      + [jnp.zeros(factors[0][0].shape[:-1] + (rank,), factors[0][0].dtype)])
    b_all = jnp.stack([_pad_axis(b, self.b_rank_axis, rank) for _, b, _ in factors]
                      + [jnp.zeros_like(_pad_axis(factors[0][1], self.b_rank_axis, rank))])
    chosen = weights[:, jnp.asarray(present)]
    rows = jnp.where(chosen.max(axis=-1) > 0, jnp.argmax(chosen, axis=-1), len(present))
    one_row = lambda x, a, b: self.project_out(self.project_in(x, a), b)
    return jax.vmap(one_row)(x, a_all[rows].astype(dtype), b_all[rows].astype(dtype))

  def _looped_delta(self, x, weights, dtype):
    """Per-sample routing by evaluating every routed adapter on the whole batch (used with dropout)."""
    total = 0
    for j, name in enumerate(self.routing_names):
      if name not in self.adapters:
        continue
      delta = self.adapters[name].delta(self, x, dtype)
      rows = weights[:, j].astype(dtype).reshape((-1,) + (1,) * (delta.ndim - 1))
      total = total + rows * delta
    return total

  def delta_weight(self, name: str) -> jax.Array:
    """Adapter ``name``'s update in the kernel's layout, ``[*stack, *kernel]``."""
    return delta_weight(self.adapters[name], self)

  def merge(self, names: Sequence[str]) -> None:
    """Fold the named adapters into the base kernel (in place).

    DoRA: ``W ← m/‖W₀ + ΔW‖ ⊙ (W + ΔW)``, the norm over the kernel without
    any merged adapter (``W₀``), as PEFT; the norm is kept for unmerging.
    """
    kernel = self.kernel()
    for name in names:
      if name in self.merged_adapters or name not in self.adapters:
        continue
      adapter = self.adapters[name]
      delta = self.delta_weight(name)
      if isinstance(adapter, DoraAdapter):
        norm = column_norm(self._unmerged_kernel() + delta, len(self.stack_shape))
        adapter.merge_norm[...] = norm
        merged = self._dora_factor(adapter) * (kernel[...] + delta)
      else:
        merged = kernel[...] + delta
      kernel[...] = merged.astype(kernel.dtype)
      self.merged_adapters = self.merged_adapters + (name,)

  def unmerge(self, names: Sequence[str] | None = None) -> None:
    """Take merged adapters out of the base kernel, newest first."""
    kernel = self.kernel()
    for name in reversed(self.merged_adapters):
      if names is not None and name not in names:
        continue
      kernel[...] = self._undo(name, kernel[...]).astype(kernel.dtype)
      self.merged_adapters = tuple(n for n in self.merged_adapters if n != name)

  def _dora_factor(self, adapter: DoraAdapter) -> jax.Array:
    factor = adapter.lora_magnitude_vector[...] / adapter.merge_norm[...]
    return along_output(factor, len(self.kernel().shape) - len(self.stack_shape), len(self.stack_shape))

  def _undo(self, name: str, kernel: jax.Array) -> jax.Array:
    adapter = self.adapters[name]
    if isinstance(adapter, DoraAdapter):
      return kernel / self._dora_factor(adapter) - self.delta_weight(name)
    return kernel - self.delta_weight(name)

  def _unmerged_kernel(self) -> jax.Array:
    """The kernel with every merged adapter taken out (not written back), float32."""
    kernel = jnp.asarray(self.kernel()[...], jnp.float32)
    for name in reversed(self.merged_adapters):
      kernel = self._undo(name, kernel)
    return kernel


def dropout_active(adapter: Adapter) -> bool:
  """Whether ``adapter`` (or a WLoRA upstream) applies dropout to its input in this call."""
  if isinstance(adapter, LoraAdapter):
    return adapter.dropout_key is not None and not adapter.deterministic
  return any(dropout_active(u) for u in adapter.upstreams)


def _pad_axis(array: jax.Array, axis: int, size: int) -> jax.Array:
  """``array`` zero-padded at the end of ``axis`` (negative axes count from the end) to ``size``."""
  axis = axis % array.ndim
  pad = [(0, 0)] * array.ndim
  pad[axis] = (0, size - array.shape[axis])
  return jnp.pad(array, pad)


def new_wlora_adapter(layer: LoraLayer, upstreams: list[LoraAdapter]) -> WLoraAdapter:
  """A WLoRA adapter over ``upstreams`` with equal initial weights."""
  logits = jnp.zeros(layer.stack_shape + (len(upstreams),), jnp.float32)
  return WLoraAdapter(upstreams, logits)


def frozen_copy(adapter: LoraAdapter, param_type: type[LoraParam]) -> LoraAdapter:
  """A copy of ``adapter`` whose factors have variable type ``param_type``."""
  copy = LoraAdapter(
      adapter.lora_A[...], adapter.lora_B[...], adapter.scaling[...],
      rank_mask=adapter.rank_mask[...] if adapter.rank_mask is not None else None,
      mixer=adapter.lora_mixer[...] if adapter.lora_mixer is not None else None,
      param_type=param_type)
  return copy


