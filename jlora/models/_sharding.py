"""Where a model's arrays live on a ``(data, fsdp, tensor)`` mesh: the sharding rules.

Shared by loading (``jlora.io`` reads each shard straight onto its devices)
and training (``jlora.train`` places params, adapter and optimizer state).

- Model params follow logical-axis rules keyed by Hugging Face module names
  (each registered family's ``sharding_rules``, then ``GENERIC_RULES`` for
  models of your own):
  a projection into the hidden size's wide side (``q_proj``, ``up_proj`` …)
  is ``[embed, mlp]``, one back (``o_proj``, ``down_proj``) ``[mlp, embed]``;
  logical ``embed`` goes to mesh axis ``fsdp``, ``mlp`` / ``heads`` /
  ``vocab`` to ``tensor``. A row-parallel kernel (``o_proj``, ``down_proj``:
  ``embed`` on its out side) puts ``fsdp`` beside ``tensor`` on its in side
  instead, ``[(tensor, fsdp), None]``, so FSDP's per-layer all-gather runs
  over the major dim of every kernel: gathering the minor dim makes XLA's GPU
  layout assignment copy the whole local stack of that kernel into a
  transposed layout (half of a 70B model's ``down_proj`` stack, 10.5 GiB, at
  fsdp=2); ``fsdp`` goes to the out side only where it does not divide the in
  side. Leading (scan) dims and dims the mesh axis does not divide are
  replicated.
- An adapter is sharded like its base layer: ``lora_A [.., in, r]`` takes the
  kernel's ``in`` axis, ``lora_B [.., r, out]`` its ``out`` axis, and both
  are also split over ``fsdp`` where that axis is not already theirs (so the
  adapter and its optimizer state shrink about 1/fsdp); the rank dim is
  replicated. A matrix no rule names (``kernel`` / ``embedding``) splits its
  larger side over ``fsdp``.
- A quantized kernel's arrays (``qkernel``, ``kernel_scale``, ``scale_offset``,
  ``scale_step``, all ``[.., rows, out]``) are sharded like the kernel.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.models._family import sharding_rules
from jlora.nn import role_of

AXES = ("data", "fsdp", "tensor")

# (regex searched in the module part of a param's path, logical axes of the kernel's (in, out) dims):
# common module names of models that no registered family builds (a family brings its own rules)
GENERIC_RULES: tuple[tuple[str, tuple[str, str]], ...] = (
    (r"(^|\.)(q_proj|k_proj|v_proj|query|key|value)$", ("embed", "heads")),
    (r"(^|\.)(gate_proj|up_proj|fc1|w1|w3)$", ("embed", "mlp")),
    (r"(^|\.)(o_proj|out_proj)$", ("heads", "embed")),
    (r"(^|\.)(down_proj|fc2|w2)$", ("mlp", "embed")),
    (r"(^|\.)(embed_tokens|tok_embeddings)$", ("vocab", "embed")),
    (r"(^|\.)(lm_head)$", ("embed", "vocab")),
)
LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
_WRAPPER_PARTS = ("base_layer", "adapters", "upstreams")
_KERNEL_NAMES = ("kernel", "embedding", "qkernel", "kernel_scale", "scale_offset", "scale_step")


def make_mesh(shape: tuple[int, int, int]) -> Mesh:
  """A ``Mesh`` of every device (all hosts) with axes ``(data, fsdp, tensor)``."""
  devices = np.asarray(jax.devices()).reshape(shape)
  return Mesh(devices, AXES)


def logical_rules() -> tuple[tuple[str, tuple[str, str]], ...]:
  """The rules ``param_spec`` applies: the registered families' first, then ``GENERIC_RULES``."""
  return sharding_rules() + GENERIC_RULES


def _logical_axes(module_path: str) -> tuple[str, str] | None:
  for pattern, axes in logical_rules():
    if re.search(pattern, module_path):
      return axes
  return None


def _dim_axes(name: str, role: str | None, axes: tuple[str, str] | None,
              shape: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
  """Mesh axes wanted per dim of a variable (before the divisibility check)."""
  if len(shape) < 2:
    return {}
  last, prev = len(shape) - 1, len(shape) - 2
  if axes is None:  # a matrix no rule names: FSDP still splits its larger side
    return {max((prev, last), key=lambda d: shape[d]): ("fsdp",)} if name in ("kernel", "embedding") else {}
  in_axis, out_axis = (LOGICAL_TO_MESH[a] for a in axes)
  with_fsdp = lambda axis: (axis,) if axis == "fsdp" else (axis, "fsdp")
  if name in _KERNEL_NAMES:
    if out_axis == "fsdp" and in_axis != "fsdp":  # row-parallel: FSDP joins the in side (see module doc)
      return {prev: (in_axis, "fsdp"), last: ("fsdp",)}
    return {prev: (in_axis,), last: (out_axis,)}
  if role == "A":  # an adapter's [.., in, r] (its kind's role): split like the kernel's in side, and fsdp
    return {prev: with_fsdp(in_axis)}
  if role == "B":  # [.., r, out]
    return {last: with_fsdp(out_axis)}
  return {}


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The ``PartitionSpec`` of one variable, from its path and shape (see the module doc)."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
    path = path[:-1]  # an nnx.Variable's ``.value``
  keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  name = keys[-1] if keys else ""
  module = keys[:-1]
  for i, k in enumerate(module):
    if k in _WRAPPER_PARTS:
      module = module[:i]
      break
  spec: list = [None] * len(shape)
  used: set[str] = set()
  for dim, wanted in _dim_axes(name, role_of(keys), _logical_axes(".".join(module)), shape).items():
    wanted = tuple(a for a in wanted if a not in used)  # a mesh axis splits one dim at most
    for n in range(len(wanted), 0, -1):  # the most axes that divide the dim
      axes = wanted[:n]
      if shape[dim] % math.prod(mesh.shape[a] for a in axes) == 0:
        spec[dim] = axes[0] if n == 1 else axes
        used.update(axes)
        break
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh):
  """A ``NamedSharding`` per array of ``state`` (same tree structure)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, np.shape(x), mesh)), state)


def shard_state(state, mesh: Mesh):
  """``state`` placed on the mesh by ``state_shardings``."""
  return jax.device_put(state, state_shardings(state, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
