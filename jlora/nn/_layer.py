"""``LoraLayer``: the wrapper that adds adapters to one base layer.

A LoRA layer type is a small subclass that says how x meets the factors
(``project_in`` / ``project_out``) and how the factors form a kernel-shaped
update (``factors_to_weight``). Everything else (several adapters, activation,
per-sample routing, merging, scanned/stacked weights) is written once, for
every layer type: here, with the per-sample routing delta in ``_routing``;
what an adapter adds, folds to or merges is its kind's own math
(``AdapterModule``), never a question of its class here.
Register a subclass for a base layer type with ``register_lora_layer``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.nn._adapters import AdapterModule
from jlora.nn._new_adapters import new_lora_adapter
from jlora.nn._routing import routed_delta
from jlora.nn._variables import LoraBuffer


class LoraLayer(nnx.Module):
  """A base layer plus named adapters whose outputs add to the base output.

  Subclasses implement the layer-type math below; shapes there are for one
  (unstacked) layer, with the rank ``r`` as the last axis of A and of
  ``project_in``'s output.

  Attributes:
    base_layer: the wrapped, frozen module (its params stay ``nnx.Param``).
    adapters: adapter name -> an ``AdapterModule`` of a registered kind.
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

  def dense_kernel(self) -> jax.Array:
    """The base kernel as the layer computes with it (a quantized layer's dequantized), ``[*stack, *kernel]``."""
    return self.kernel()[...]

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self.stack_shape_of(self.base_layer)

  def new_lora_adapter(self, key, ranks, scalings, **kwargs) -> AdapterModule:
    """Deprecated: a fresh LoRA / MoSLoRA / DoRA adapter for this layer (kinds build adapters now,
    see ``jlora.register_adapter_kind``); ``kwargs`` as ``init_lora_weights``, ``mixer_init``, ...."""
    return new_lora_adapter(self, key, ranks, scalings, **kwargs)

  def supports_dropout(self) -> bool:
    """Dropout applies to real-valued inputs; embeddings take ids."""
    return not self.embedding_init

  def add(self, name: str, adapter: AdapterModule) -> None:
    """Attach an adapter under ``name`` (inactive until activated)."""
    if name in self.adapters:
      raise ValueError(f"{self.module_names[0]} already has an adapter named {name!r}.")
    adapter.check(self, name)
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
      return y + routed_delta(self, x, y.dtype)
    for name in self.active_adapters:
      if name in self.adapters and name not in self.merged_adapters:
        adapter = self.adapters[name]
        if adapter.output_hook:  # as PEFT's DoRA, on the output so far (other adapters in it)
          y = y + adapter.output_delta(self, x, y, *args, **kwargs).astype(y.dtype)
        else:
          y = y + adapter.delta(self, x, y.dtype).astype(y.dtype)
    return y

  def delta_weight(self, name: str) -> jax.Array:
    """Adapter ``name``'s update in the kernel's layout, ``[*stack, *kernel]``."""
    return self.adapters[name].delta_weight(self)

  def merge(self, names: Sequence[str]) -> None:
    """Fold the named adapters into the base kernel (in place), each by its kind's ``merge``."""
    kernel = self.kernel()
    for name in names:
      if name in self.merged_adapters or name not in self.adapters:
        continue
      kernel[...] = self.adapters[name].merge(self, kernel[...]).astype(kernel.dtype)
      self.merged_adapters = self.merged_adapters + (name,)

  def check_merge(self, names: Sequence[str]) -> None:
    """Raise if merging ``names`` would put a non-finite value in the kernel (``safe_merge``); no write."""
    kernel = self.kernel()[...]
    for name in names:
      if name in self.merged_adapters or name not in self.adapters:
        continue
      kernel = self.adapters[name].merge(self, kernel)
      if not bool(jnp.isfinite(kernel).all()):
        raise ValueError(f"NaNs detected in the merged weights of {self.module_names[0]}: the adapter {name!r} "
                         "seems to be broken (non-finite factors); nothing was merged. Retrain or reload it.")

  def unmerge(self, names: Sequence[str] | None = None) -> None:
    """Take merged adapters out of the base kernel, newest first."""
    kernel = self.kernel()
    for name in reversed(self.merged_adapters):
      if names is not None and name not in names:
        continue
      kernel[...] = self._undo(name, kernel[...]).astype(kernel.dtype)
      self.merged_adapters = tuple(n for n in self.merged_adapters if n != name)

  def _undo(self, name: str, kernel: jax.Array) -> jax.Array:
    return self.adapters[name].unmerge(self, kernel)

  def unmerged_kernel(self) -> jax.Array:
    """The kernel with every merged adapter taken out (not written back), float32."""
    kernel = jnp.asarray(self.kernel()[...], jnp.float32)
    for name in reversed(self.merged_adapters):
      kernel = self._undo(name, kernel)
    return kernel

