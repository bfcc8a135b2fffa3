"""One code path from one CPU to many hosts: a ``(data, fsdp, tensor)`` mesh and where arrays live.

- Batches are split over ``("data", "fsdp")``.
- Params, adapters and optimizer state follow the rules of
  ``jlora.models`` (``param_spec``), re-exported here.
- Under a mesh the train step gathers each scanned layer's weights inside the
  scan body, one layer at a time (``MeshPlacement``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.models import (  # noqa: F401  (the rules live beside the models; re-exported)
    AXES, LOGICAL_TO_MESH, make_mesh, param_spec, replicated, shard_state, state_shardings)
from jlora.train._distributed import initialize_distributed  # noqa: F401  (re-exported)

BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """A mesh that does not fit the devices or the batch."""


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a ``[batch, ...]`` array split over ``(data, fsdp)``, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


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


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows of a global batch of ``batch_size`` that this process's devices hold.

  Rows are split over ``(data, fsdp)`` in device order, so a process's rows
  are one contiguous run (the whole batch with one process).
  """
  index = batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()
  starts = [range(batch_size)[i[0]].start for i in index]
  stops = [range(batch_size)[i[0]].stop for i in index]
  return slice(min(starts), max(stops))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, global_size: int | None = None) -> dict[str, jax.Array]:
  """Host rows as global arrays split over ``(data, fsdp)``; works across hosts.

  ``global_size=None``: ``batch`` is the whole global batch. Otherwise it
  holds only this process's rows, ``process_rows(mesh, global_size)`` of a
  global batch of ``global_size`` rows, and each device takes its rows from them.
  """
  sharding = batch_sharding(mesh)
  if global_size is None:
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}
  rows = process_rows(mesh, global_size)
  for k, v in batch.items():
    if len(v) != rows.stop - rows.start:
      raise ValueError(f"batch[{k!r}] has {len(v)} rows but this process holds rows {rows.start}:{rows.stop} "
                       f"of the global batch of {global_size}; pass exactly those rows.")

  def local(v, idx):
    r = range(global_size)[idx[0]]
    return v[(slice(r.start - rows.start, r.stop - rows.start),) + tuple(idx[1:])]

  return {k: jax.make_array_from_callback((global_size,) + v.shape[1:], sharding, lambda idx, v=v: local(v, idx))
          for k, v in batch.items()}


def init_on_mesh(init, params):
  """``init(params)`` (e.g. an optimizer's ``tx.init``) placed where the train step will return it.

  A leaf whose path ends with a parameter's path, and has its shape (Adam's
  moments, accumulated gradients), takes that parameter's sharding; any other
  leaf (step counters) is replicated over the parameters' mesh. Placed so
  before the first step, the jitted step sees the same input shardings at
  every step and compiles once (left uncommitted, the counters would come
  back committed to the mesh after step 1 and trigger a second compile).
  """
  keys = lambda path: tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  by_path = {keys(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
  mesh = next((x.sharding.mesh for x in by_path.values() if isinstance(x.sharding, NamedSharding)), None)
  if mesh is None:  # not on a mesh: nothing to commit to
    return jax.jit(init)(params)

  def sharding(path, leaf):
    path = keys(path)
    for start in range(len(path)):
      param = by_path.get(path[start:])
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated(mesh)

  shardings = jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(init, params))
  return jax.jit(init, out_shardings=shardings)(params)
