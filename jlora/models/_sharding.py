"""Where a model's arrays live on a ``(data, fsdp, tensor)`` mesh: the sharding rules.

Shared by loading (``jlora.io`` reads each shard straight onto its devices)
and training (``jlora.train`` places params, adapter and optimizer state).

- Model params follow logical-axis rules keyed by Hugging Face module names:
  a projection into the hidden size's wide side (``q_proj``, ``up_proj`` …)
  is ``[embed, mlp]``, one back (``o_proj``, ``down_proj``) ``[mlp, embed]``;
  logical ``embed`` goes to mesh axis ``fsdp``, ``mlp`` / ``heads`` /
  ``vocab`` to ``tensor``. Leading (scan) dims and dims the mesh axis does not
  divide are replicated.
- An adapter is sharded like its base layer: ``lora_A [.., in, r]`` takes the
  kernel's ``in`` axis, ``lora_B [.., r, out]`` its ``out`` axis; the rank
  dim is replicated.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

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




def make_mesh(shape: tuple[int, int, int]) -> Mesh:
  """A ``Mesh`` of every device (all hosts) with axes ``(data, fsdp, tensor)``."""
  devices = np.asarray(jax.devices()).reshape(shape)
  return Mesh(devices, AXES)


def _logical_axes(module_path: str) -> tuple[str, str] | None:
  for pattern, axes in LOGICAL_RULES:
    if re.search(pattern, module_path):
      return axes
  return None


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
  axes = _logical_axes(".".join(module))
  spec = [None] * len(shape)
  if axes is None or len(shape) < 2:
    return P(*spec)
  in_axis, out_axis = (LOGICAL_TO_MESH[a] for a in axes)
  if name in ("kernel", "embedding"):
    dims = {len(shape) - 2: in_axis, len(shape) - 1: out_axis}
  elif name == "lora_A":
    dims = {len(shape) - 2: in_axis}
  elif name == "lora_B":
    dims = {len(shape) - 1: out_axis}
  else:
    dims = {}
  for dim, axis in dims.items():
    if shape[dim] % mesh.shape[axis] == 0:
      spec[dim] = axis
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
