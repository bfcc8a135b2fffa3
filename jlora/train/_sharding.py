"""One code path from one CPU to many hosts: a ``(data, fsdp, tensor)`` mesh and where arrays live.

- Batches are split over ``("data", "fsdp")``.
- Params, adapters and optimizer state follow the rules of
  ``jlora.models._sharding`` (``param_spec``), re-exported here.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.models._sharding import (  # noqa: F401  (the rules live beside the models; re-exported)
    AXES, LOGICAL_RULES, LOGICAL_TO_MESH, make_mesh, param_spec, replicated, shard_state, state_shardings)

BATCH_AXES = ("data", "fsdp")


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
