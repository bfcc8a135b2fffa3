"""LoRA for Flax's own layers: Linear, LinearGeneral, Einsum, Embed, Conv.

Each registers through the public ``register_lora_layer``; the factor layouts
follow Flax's kernel layouts ([in, out]), i.e. PEFT's A/B transposed.
"""

from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from jlora.nn._adapters import scaled_concat
from jlora.nn._fused import lora_matmul
from jlora.nn._layer import LoraLayer
from jlora.nn._registry import register_lora_layer


@register_lora_layer(nnx.Linear)
class LoraLinear(LoraLayer):
  """``nnx.Linear`` (kernel ``[in, out]``): A ``[in, r]``, B ``[r, out]``.

  Its forward pass goes through ``lora_matmul`` (stacked or merged on the fly above a
  token threshold, low-rank backward) unless ``matmul_mode`` is ``"plain"``
  or the call needs the generic path (dropout, per-sample routing, a custom
  ``dot_general``). ``set_lora_matmul`` sets the mode for a whole model.
  """

  matmul_mode: str = "plain"
  """``"plain"`` | ``"exact"`` | ``"auto"`` | ``"fused"`` (``jlora.nn.MATMUL_MODES``); ``set_lora_matmul``
  opts a model in. ``"exact"`` and ``"plain"`` compute the same sum; ``"auto"`` and ``"fused"``
  round ``W + A·B`` to the compute dtype once (an update below W's spacing is lost)."""
  shared_input: bool = True
  """Whether ``lora_projections`` may fuse this layer with siblings reading the same input."""

  def fused_parts(self, x):
    """``(x, kernel, bias, (A', B), dtype)`` for ``lora_matmul``, or None when it must run unfused.

    ``A'`` is every active adapter's folded, scaled A concatenated along the
    rank (``[in, R]``, R may be 0), ``B`` the matching ``[R, out]``.
    """
    if self.matmul_mode == "plain":
      return None
    parts = linear_parts(self.base_layer, x)
    factors = None if parts is None else self.folded_factors()
    if factors is None:
      return None
    x, kernel, bias, dtype = parts
    return x, kernel, bias, factors if factors[0].shape[-1] else zero_rank(kernel), dtype

  def folded_factors(self) -> tuple[jax.Array, jax.Array] | None:
    """The active adapters as one plain LoRA ``(A' [in, R], B [R, out])``, scaling folded into A'.

    R is the sum of their ranks (0 without an active adapter); None when the
    call needs the generic path (per-sample routing, dropout, an adapter that does not fold to
    plain LoRA or acts on the output, as DoRA).
    """
    if self.routing is not None:
      return None
    adapters = [] if self.disabled else [
        self.adapters[n] for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
    if any(a.dropout_active() or a.output_hook or not a.folds_to_lora for a in adapters):
      return None
    if not adapters:
      n_in, n_out = self.base_layer.in_features, self.base_layer.out_features
      return jnp.zeros((n_in, 0), jnp.float32), jnp.zeros((0, n_out), jnp.float32)
    factors = [adapter.lora_factors(self) for adapter in adapters]
    return scaled_concat([(a, b, s.astype(a.dtype)) for a, b, s in factors], 0)

  def __call__(self, x, *args, **kwargs):
    parts = None if args or kwargs else self.fused_parts(x)
    if parts is None:
      return super().__call__(x, *args, **kwargs)
    x, kernel, bias, factors, dtype = parts
    (y,) = lora_matmul(x, [kernel], [factors], mode=self.matmul_mode, dtype=dtype,
                       precision=self.base_layer.precision)
    return y if bias is None else y + bias

  supports_dora = True

  @classmethod
  def kernel_ndim(cls, base):
    return 2

  def factor_shapes(self, rank):
    return (self.base_layer.in_features, rank), (rank, self.base_layer.out_features)

  def project_in(self, x, a):
    return x @ a

  def project_out(self, h, b):
    return h @ b

  def factors_to_weight(self, a, b):
    return a @ b


def linear_parts(base: nnx.Linear, x):
  """``(x, kernel, bias, dtype)`` of an ``nnx.Linear`` call promoted as the layer does, or None
  when the layer computes in a way ``lora_matmul`` does not reproduce (custom dot_general,
  preferred element type, stacked kernel)."""
  if not isinstance(base, nnx.Linear) or base.dot_general is not jax.lax.dot_general \
      or base.preferred_element_type is not None:
    return None  # e.g. a quantized base, whose kernel is dequantized inside its own matmul
  kernel = base.kernel[...]
  if kernel.ndim != 2:
    return None
  bias = base.bias[...] if base.bias is not None else None
  x, kernel, bias = base.promote_dtype((x, kernel, bias), dtype=base.dtype)
  return x, kernel, bias, x.dtype


def zero_rank(kernel):
  """Empty factors (``A [in, 0]``, ``B [0, out]``) for a projection without adapters."""
  return jnp.zeros(kernel.shape[:1] + (0,), kernel.dtype), jnp.zeros((0,) + kernel.shape[1:], kernel.dtype)


@register_lora_layer(nnx.LinearGeneral)
class LoraLinearGeneral(LoraLayer):
  """``nnx.LinearGeneral``: A ``[*in_features, r]``, B ``[r, *out_features]``."""

  def check_base_layer(self):
    if self.base_layer.batch_axis:
      raise ValueError("LoRA for nnx.LinearGeneral with batch_axis is not supported.")

  @classmethod
  def kernel_ndim(cls, base):
    return len(base.in_features) + len(base.out_features)

  def factor_shapes(self, rank):
    return (tuple(self.base_layer.in_features) + (rank,),
            (rank,) + tuple(self.base_layer.out_features))

  def project_in(self, x, a):
    axes = tuple(ax % x.ndim for ax in self.base_layer.axis)
    n_in = len(self.base_layer.in_features)
    return jax.lax.dot_general(x, a, ((axes, tuple(range(n_in))), ((), ())))

  def project_out(self, h, b):
    return jnp.tensordot(h, b, axes=1)

  def factors_to_weight(self, a, b):
    return jnp.tensordot(a, b, axes=1)


@register_lora_layer(nnx.Einsum)
class LoraEinsum(LoraLayer):
  """``nnx.Einsum`` ``"<inputs>,<kernel>-><out>"``.

  Kernel axes split into contracted (in the inputs only), output (in the
  output only) and shared (in both, e.g. per-head weights). A spans shared +
  contracted axes and the rank; B spans shared axes, the rank and the output
  axes, so ``A·B`` contracts the rank back into the kernel's layout.
  """

  def check_base_layer(self):
    self._specs()

  def _specs(self):
    lhs, out = self.base_layer.einsum_str.replace(" ", "").split("->")
    inputs, kernel = lhs.split(",")
    if "." in kernel:
      raise ValueError(f"LoRA for nnx.Einsum needs an explicit kernel spec, got {kernel!r}.")
    free = [c for c in string.ascii_letters if c not in self.base_layer.einsum_str]
    rank = free[0]
    summed = [c for c in kernel if c not in inputs and c not in out]
    if summed:
      raise ValueError(f"LoRA for nnx.Einsum: kernel axes {summed} are summed away; unsupported.")
    shared = "".join(c for c in kernel if c in inputs and c in out)
    contracted = "".join(c for c in kernel if c in inputs and c not in out)
    outputs = "".join(c for c in kernel if c in out and c not in inputs)
    a_spec = shared + contracted + rank
    b_spec = shared + rank + outputs
    h_spec = "".join(c for c in out if c in inputs or c == ".") + rank
    return inputs, kernel, out, a_spec, b_spec, h_spec, shared, contracted, outputs

  @property
  def b_rank_axis(self):
    return len(self._specs()[6])

  def svd_compatible(self):
    _, kernel, _, _, _, _, shared, contracted, outputs = self._specs()
    return not shared and kernel == contracted + outputs

  @classmethod
  def kernel_ndim(cls, base):
    return len(base.kernel_shape)

  def factor_shapes(self, rank):
    _, kernel, _, _, _, _, shared, contracted, outputs = self._specs()
    size = dict(zip(kernel, self.base_layer.kernel_shape))
    dims = lambda axes: tuple(size[c] for c in axes)
    return dims(shared) + dims(contracted) + (rank,), dims(shared) + (rank,) + dims(outputs)

  def fan_in(self, a_shape):
    _, _, _, _, _, _, shared, contracted, _ = self._specs()
    return math.prod(a_shape[len(shared):-1]) or 1

  def project_in(self, x, a):
    inputs, _, _, a_spec, _, h_spec, *_ = self._specs()
    return jnp.einsum(f"{inputs},{a_spec}->{h_spec}", x, a)

  def project_out(self, h, b):
    _, _, out, _, b_spec, h_spec, *_ = self._specs()
    return jnp.einsum(f"{h_spec},{b_spec}->{out}", h, b)

  def factors_to_weight(self, a, b):
    _, kernel, _, a_spec, b_spec, *_ = self._specs()
    return jnp.einsum(f"{a_spec},{b_spec}->{kernel}", a, b)


@register_lora_layer(nnx.Embed)
class LoraEmbed(LoraLayer):
  """``nnx.Embed`` (table ``[num_embeddings, features]``): A ``[num, r]``, B ``[r, features]``.

  As in PEFT, A starts at zero and B random; ``attend`` (a tied output head)
  uses the base table, so it sees the adapter only once merged.
  """

  linear_like = False
  embedding_init = True
  supports_dora = True

  @classmethod
  def base_kernel(cls, base):
    return base.embedding

  @classmethod
  def kernel_ndim(cls, base):
    return 2

  def factor_shapes(self, rank):
    return (self.base_layer.num_embeddings, rank), (rank, self.base_layer.features)

  def project_in(self, ids, a):
    return jnp.take(a, ids, axis=0)

  def project_out(self, h, b):
    return h @ b

  def factors_to_weight(self, a, b):
    return a @ b

  def attend(self, query):
    return self.base_layer.attend(query)


@register_lora_layer(nnx.Conv)
class LoraConv(LoraLayer):
  """``nnx.Conv`` (kernel ``[*window, in, out]``), as PEFT's Conv LoRA.

  A is a convolution ``[*window, in, r]`` with the base's strides, padding and
  dilation; B a 1×1 convolution, i.e. a ``[r, out]`` matrix on the channels.
  """

  linear_like = False
  supports_dora = True

  def check_base_layer(self):
    base = self.base_layer
    if base.feature_group_count != 1:
      raise ValueError("LoRA for grouped convolutions (feature_group_count > 1) is not supported.")
    if base.mask is not None:
      raise ValueError("LoRA for masked convolutions is not supported.")
    padding = canonicalize_padding(base.padding, len(base.kernel_size))
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
      raise ValueError(f"LoRA for nnx.Conv with padding={padding!r} is not supported.")

  @classmethod
  def kernel_ndim(cls, base):
    return len(base.kernel_size) + 2

  def factor_shapes(self, rank):
    base = self.base_layer
    return tuple(base.kernel_size) + (base.in_features, rank), (rank, base.out_features)

  def project_in(self, x, a):
    base = self.base_layer
    n = len(base.kernel_size)
    as_tuple = lambda v: (v,) * n if isinstance(v, int) or v is None else tuple(v)
    batch_shape = x.shape[: x.ndim - (n + 1)]
    # lax.conv needs one dtype; like nnx.Conv, compute in the factors' (the layer's) dtype.
    flat = x.reshape((-1,) + x.shape[x.ndim - (n + 1):]).astype(a.dtype)
    spatial = "".join("HWDXYZ"[i] for i in range(n))
    dims = jax.lax.conv_dimension_numbers(
        flat.shape, a.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    h = jax.lax.conv_general_dilated(
        flat, a,
        window_strides=as_tuple(base.strides or 1),
        padding=canonicalize_padding(base.padding, n),
        lhs_dilation=as_tuple(base.input_dilation or 1),
        rhs_dilation=as_tuple(base.kernel_dilation or 1),
        dimension_numbers=dims,
        precision=base.precision)
    return h.reshape(batch_shape + h.shape[1:])

  def project_out(self, h, b):
    return h @ b

  def factors_to_weight(self, a, b):
    return jnp.tensordot(a, b, axes=1)
