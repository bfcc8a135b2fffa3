"""Several processes, one job: the launcher's environment, ``jax.distributed``, barriers, gathers.

Each process of a multi-host job is started with the same command and

- ``JAX_COORDINATOR_ADDRESS=host:port`` (process 0's host, a free port),
- ``JAX_NUM_PROCESSES=N`` and ``JAX_PROCESS_ID=i`` (``0 <= i < N``),

or by a cluster launcher ``jax.distributed`` detects itself (Slurm, Open MPI,
a multi-worker TPU VM). An environment that names some of these but not a
consistent set is refused with one error before anything starts.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

COORDINATOR, COUNT, RANK = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
_LAUNCH = (f"start every process with the same {COORDINATOR}=<host of process 0>:<free port>, "
           f"{COUNT}=<number of processes> and its own {RANK}=0..N-1")


class LaunchError(ValueError):
  """The launcher's environment does not describe one consistent multi-process job."""


def _cluster_detected() -> bool:
  """A launcher ``jax.distributed.initialize()`` reads itself: Slurm, Open MPI, a multi-worker TPU VM."""
  env = os.environ
  return ("," in env.get("TPU_WORKER_HOSTNAMES", "") or "OMPI_MCA_orte_hnp_uri" in env
          or ("SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1))


def _int_var(env: Mapping[str, str], name: str) -> int | None:
  raw = env.get(name)
  if raw is None or raw == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise LaunchError(f"{name}={raw!r} is not an integer; {_LAUNCH}.") from None


def launch_settings(env: Mapping[str, str] | None = None,
                    cluster: bool | None = None) -> tuple[str, int, int] | None:
  """``(coordinator, num_processes, process_id)`` from the environment; None for one process.

  None also when a cluster launcher is detected and the ``JAX_*`` variables
  leave the rest to it. Raises ``LaunchError`` for an inconsistent set.
  """
  env = os.environ if env is None else env
  coordinator = env.get(COORDINATOR) or None
  count, rank = _int_var(env, COUNT), _int_var(env, RANK)
  if count is None:
    if rank is not None:
      raise LaunchError(f"{RANK}={rank} is set but {COUNT} is not; {_LAUNCH}.")
    if coordinator is None:
      return None
    if (_cluster_detected() if cluster is None else cluster):
      return None
    raise LaunchError(f"{COORDINATOR}={coordinator} is set but {COUNT} is not, so the job's process count "
                      f"is unknown; {_LAUNCH}.")
  if count < 1:
    raise LaunchError(f"{COUNT}={count}: a job needs at least one process; {_LAUNCH}.")
  if rank is None:
    raise LaunchError(f"{COUNT}={count} is set but {RANK} is not, so this process does not know which "
                      f"one it is; {_LAUNCH}.")
  if not 0 <= rank < count:
    raise LaunchError(f"{RANK}={rank} is out of range for {COUNT}={count}: process ids run 0..{count - 1}; "
                      f"{_LAUNCH}.")
  if count == 1:
    return None
  if coordinator is None:
    raise LaunchError(f"{COUNT}={count} but {COORDINATOR} is not set, so the processes cannot find each "
                      f"other; {_LAUNCH}.")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise LaunchError(f"{COORDINATOR}={coordinator!r} is not host:port; {_LAUNCH}.")
  return coordinator, count, rank


def initialize_distributed() -> bool:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Validates the environment first (``launch_settings``). A no-op for one
  process and when already initialised (then the environment's process count
  must match ``jax.process_count()``). On CPU the processes talk through
  gloo collectives. Returns whether it initialised.
  """
  settings = launch_settings()
  if jax.distributed.is_initialized():
    if settings is not None and settings[1] != jax.process_count():
      raise LaunchError(f"{COUNT}={settings[1]} but jax.distributed was initialised with "
                        f"{jax.process_count()} processes; make them agree.")
    return False
  multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if settings is None and not (os.environ.get(COORDINATOR) or multi_tpu):
    return False
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if settings is None:
    jax.distributed.initialize()
  else:
    coordinator, count, rank = settings
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=rank)
  return True


def barrier(name: str) -> None:
  """Wait until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def gather_to_host(tree):
  """Every array of ``tree`` whole on this host (numpy), from shards on all processes' devices."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def is_local(tree) -> bool:
  """Whether every array of ``tree`` is held whole by this process's devices."""
  return all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree))
