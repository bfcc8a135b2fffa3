"""One code path from one CPU to many hosts: a ``(data, fsdp, tensor)`` mesh and where arrays live.

- Batches are split over ``("data", "fsdp")``.
- Params, adapters and optimizer state follow the rules of
  ``jlora.models._sharding`` (``param_spec``), re-exported here.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.models._sharding import (  # noqa: F401  (the rules live beside the models; re-exported)
    AXES, LOGICAL_RULES, LOGICAL_TO_MESH, make_mesh, param_spec, replicated, shard_state, state_shardings)
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
  return NamedSharding(mesh, P(BATCH_AXES))


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
