"""One code path from one CPU to many hosts: a ``(data, fsdp, tensor)`` mesh and where arrays live.

- Batches are split over ``("data", "fsdp")``.
- Model params follow logical-axis rules keyed by Hugging Face module names:
  a projection into the hidden size's wide side (``q_proj``, ``up_proj`` …)
  is ``[embed, mlp]``, one back (``o_proj``, ``down_proj``) ``[mlp, embed]``;
  logical ``embed`` goes to mesh axis ``fsdp``, ``mlp`` / ``heads`` /
  ``vocab`` to ``tensor``. Leading (scan) dims and dims the mesh axis does not
  divide are replicated.
- An adapter is sharded like its base layer: ``lora_A [.., in, r]`` takes the
  kernel's ``in`` axis, ``lora_B [.., r, out]`` its ``out`` axis, and both
  are also split over ``fsdp`` where that axis is not already theirs (so the
  adapter and its optimizer state shrink about 1/fsdp); the rank dim is
  replicated. A matrix no rule names (``kernel`` / ``embedding``) splits its
  larger side over ``fsdp``.
- Under a mesh the train step gathers each scanned layer's weights inside the
  scan body, one layer at a time (``MeshPlacement``).
"""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex searched in the module part of a param's path, logical axes of the kernel's (in, out) dims)
LOGICAL_RULES: tuple[tuple[str, tuple[str, str]], ...] = (
    (r"(^|\.)(q_proj|k_proj|v_proj|query|key|value|c_attn)$", ("embed", "heads")),
    (r"(^|\.)(gate_proj|up_proj|fc1|c_fc|w1|w3)$", ("embed", "mlp")),
    (r"(^|\.)(o_proj|out_proj|c_proj)$", ("heads", "embed")),
    (r"(^|\.)(down_proj|fc2|w2)$", ("mlp", "embed")),
    (r"(^|\.)(embed_tokens|wte|tok_embeddings)$", ("vocab", "embed")),
    (r"(^|\.)(lm_head)$", ("embed", "vocab")),
)
LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
_WRAPPER_PARTS = ("base_layer", "adapters", "upstreams")


class MeshError(ValueError):
  """A mesh that does not fit the devices or the batch."""


def initialize_distributed() -> bool:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Detected from ``JAX_COORDINATOR_ADDRESS`` (set by the launcher, with
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) or a multi-worker TPU VM; a no-op
  otherwise and when already initialised. Returns whether it initialised.
  """
  multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or multi_tpu):
    return False
  if jax.distributed.is_initialized():
    return False
  jax.distributed.initialize()
  return True


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, batch_size: int,
                       num_devices: int | None = None) -> tuple[int, int, int]:
  """Check the mesh against the devices and the global batch; ``data=-1`` fills the rest."""
  n = jax.device_count() if num_devices is None else num_devices
  if data == -1:
    if n % (fsdp * tensor):
      raise MeshError(
          f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} devices; pick sizes whose "
          f"product divides {n}.")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise MeshError(
        f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) has {data * fsdp * tensor} devices but "
        f"{n} are available; make data*fsdp*tensor == {n} (or set mesh.data=-1).")
  if batch_size % (data * fsdp):
    raise MeshError(
        f"batch_size={batch_size} is not divisible by data*fsdp={data * fsdp}, the devices the batch is "
        f"split over; use a batch_size that is a multiple of {data * fsdp}.")
  return data, fsdp, tensor


def make_mesh(shape: tuple[int, int, int]) -> Mesh:
  """A ``Mesh`` of every device (all hosts) with axes ``(data, fsdp, tensor)``."""
  devices = np.asarray(jax.devices()).reshape(shape)
  return Mesh(devices, AXES)


def _logical_axes(module_path: str) -> tuple[str, str] | None:
  for pattern, axes in LOGICAL_RULES:
    if re.search(pattern, module_path):
      return axes
  return None


def _dim_axes(name: str, axes: tuple[str, str] | None, shape: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
  """Mesh axes wanted per dim of a variable (before the divisibility check)."""
  if len(shape) < 2:
    return {}
  last, prev = len(shape) - 1, len(shape) - 2
  if axes is None:  # a matrix no rule names: FSDP still splits its larger side
    return {max((prev, last), key=lambda d: shape[d]): ("fsdp",)} if name in ("kernel", "embedding") else {}
  in_axis, out_axis = (LOGICAL_TO_MESH[a] for a in axes)
  with_fsdp = lambda axis: (axis,) if axis == "fsdp" else (axis, "fsdp")
  if name in ("kernel", "embedding"):
    return {prev: (in_axis,), last: (out_axis,)}
  if name == "lora_A":  # [.., in, r]: split like the kernel's in side, and over fsdp too
    return {prev: with_fsdp(in_axis)}
  if name == "lora_B":  # [.., r, out]
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
  for dim, wanted in _dim_axes(name, _logical_axes(".".join(module)), shape).items():
    for n in range(len(wanted), 0, -1):  # the most axes that divide the dim
      axes = wanted[:n]
      if shape[dim] % math.prod(mesh.shape[a] for a in axes) == 0:
        spec[dim] = axes[0] if n == 1 else axes
        break
  return P(*spec)


def _fsdp_dim(spec: P) -> int | None:
  for dim, axes in enumerate(spec):
    if axes == "fsdp" or (isinstance(axes, tuple) and "fsdp" in axes):
      return dim
  return None


def gathered_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The spec one layer's variable is computed with: ``param_spec`` without the ``fsdp`` axis.

  FSDP stores weights split over ``fsdp`` and gathers them for the matmul;
  the ``tensor`` split stays (Megatron-style column / row parallel layers).
  """
  def drop(axes):
    if isinstance(axes, tuple):
      rest = tuple(a for a in axes if a != "fsdp")
      return rest[0] if len(rest) == 1 else (rest or None)
    return None if axes == "fsdp" else axes
  return P(*(drop(axes) for axes in param_spec(path, shape, mesh)))


class MeshPlacement:
  """The ``jlora.models`` layer placement of a mesh: batch-split activations, per-layer gathered weights.

  Each scanned layer's weights are gathered over ``fsdp`` with an explicit
  ``all_gather`` (``shard_map``) on that layer's slice: the partitioner then
  neither gathers the stacked weights of all layers at once nor transposes
  the whole stack to suit a gather, and activations never leave their rows.
  """

  def __init__(self, mesh: Mesh):
    self.mesh = mesh

  def activations(self, x: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, batch_sharding(self.mesh))

  def layer_weights(self, state: nnx.State) -> nnx.State:
    if self.mesh.shape["fsdp"] == 1:
      return state
    return jax.tree_util.tree_map_with_path(self._gather, state)

  def _gather(self, path, x):
    spec = param_spec(path, np.shape(x), self.mesh)
    dim = _fsdp_dim(spec)
    if dim is None:
      return x
    gather = lambda local: jax.lax.all_gather(local, "fsdp", axis=dim, tiled=True)
    return jax.shard_map(gather, mesh=self.mesh, in_specs=spec, check_vma=False,
                         out_specs=gathered_spec(path, np.shape(x), self.mesh))(x)


def placement(mesh: Mesh | None) -> MeshPlacement | None:
  """The placement to trace the model under, or None on one device (nothing to place)."""
  if mesh is None or mesh.size == 1:
    return None
  return MeshPlacement(mesh)


def state_shardings(state: nnx.State, mesh: Mesh):
  """A ``NamedSharding`` per array of ``state`` (same tree structure)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, np.shape(x), mesh)), state)


def shard_state(state, mesh: Mesh):
  """``state`` placed on the mesh by ``state_shardings``."""
  return jax.device_put(state, state_shardings(state, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A host-side global batch as arrays split over ``(data, fsdp)``; works across hosts.

  Every process holds the same global batch (the data stream is
  deterministic); each places only the shards its devices own.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}
