"""Checkpoints of the training state with orbax: async, keep-N, atomic, resumable.

A checkpoint is one step directory holding

- ``state``: the arrays of the training state pytree (adapter params,
  optimizer state, dropout RNG state), saved as a flat ``{index: array}``
  dict so any pytree (``nnx.State``, optax states) round-trips through its
  treedef, which the job rebuilds itself;
- ``meta``: JSON with the step, the data-iterator state and the config.

Orbax writes each step into a temporary directory and renames it when the
write is complete, so a job killed mid-save leaves no half-written step
(the temporary one is ignored and cleaned up); ``max_to_keep`` deletes old
steps only after a newer one is complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P


class Checkpointer:
  """Save and restore ``(state pytree, meta dict)`` under ``directory``."""

  def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Start saving ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as ``step``."""
    leaves = jax.tree.leaves(state)
    flat = {f"{i:06d}": x for i, x in enumerate(leaves)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of ``step``, ``state`` shaped, typed and sharded like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    abstract = {f"{i:06d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
                for i, (x, sharding) in enumerate(zip(leaves, _restore_shardings(leaves)))}
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    restored = [out.state[f"{i:06d}"] for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, restored), dict(out.meta)

  def wait(self) -> None:
    """Block until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _restore_shardings(leaves: list) -> list:
  """Each leaf's sharding; leaves on one device (an optimizer's step count, made by ``jit`` from no
  input) go replicated over the mesh of the others, so that they restore onto every process's
  devices and enter the sharded step beside them."""
  shardings = [getattr(x, "sharding", None) for x in leaves]
  mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
  if mesh is None:
    return shardings
  return [s if isinstance(s, NamedSharding) else NamedSharding(mesh, P()) for s in shardings]
