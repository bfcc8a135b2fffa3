"""Checkpoint tensors read block by block, straight onto the devices that hold them.

A parameter of the model is a ``ParamSource``: the memory-mapped (unread)
Hugging Face tensor(s) behind it and how to lay them out in Flax: ``nn.Linear``
weights ``[out, in]`` are transposed to ``[in, out]``; a stacked (scanned)
parameter ``[L, ...]`` is assembled from ``L`` per-layer tensors.

``place`` builds the parameter as one ``jax.Array`` with
``jax.make_array_from_callback``: each device asks for its block (an index
of the global shape) and gets just that block, read from the file, laid out
and converted to the parameter dtype. Nothing else is read, so host memory
peaks at about one parameter (its distinct blocks), never the model, and a
process of a multi-host job reads only what its own devices hold.

``transform(source, block) -> block`` runs on every block after it is read
(e.g. to quantize while loading).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding

from jlora.models import AXES, param_spec


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where one model parameter is in the checkpoint.

  Attributes:
    path: the parameter's path in the model's ``nnx`` state.
    names: its HF tensor name(s): one, or one per layer of a stacked param.
    tensors: the HF tensors (memory-mapped, unread), same order as ``names``.
    transpose: HF stores it ``[..., out, in]``; Flax wants ``[..., in, out]``.
    stacked: ``tensors[i]`` is layer ``i`` of a ``[L, ...]`` param.
    shape: the parameter's (Flax) shape.
  """

  path: tuple
  names: tuple[str, ...]
  tensors: tuple[np.ndarray, ...]
  transpose: bool
  stacked: bool
  shape: tuple[int, ...]

  def read(self, index: tuple[slice, ...], dtype) -> np.ndarray:
    """Block ``index`` (a slice per dim of ``shape``) in Flax layout as ``dtype``; reads only that block."""
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
    if not self.stacked:
      return read_block(self.tensors[0], index, self.transpose, dtype)
    layers = range(len(self.tensors))[index[0]]
    first = read_block(self.tensors[layers[0]], index[1:], self.transpose, dtype)
    out = np.empty((len(layers),) + first.shape, first.dtype)
    out[0] = first
    del first
    for i, layer in enumerate(layers[1:], 1):
      out[i] = read_block(self.tensors[layer], index[1:], self.transpose, dtype)
    return out


def read_block(tensor: np.ndarray, index: tuple[slice, ...], transpose: bool, dtype) -> np.ndarray:
  """A contiguous copy of ``tensor`` (HF layout, memory-mapped) at the Flax-layout ``index``.

  The one place checkpoint bytes are copied into host memory.
  """
  if transpose:
    hf_index = tuple(index[:-2]) + (index[-1], index[-2])
    return np.array(np.swapaxes(tensor[hf_index], -1, -2), dtype=dtype, order="C")
  return np.array(tensor[tuple(index)], dtype=dtype, order="C")


Transform = Callable[[ParamSource, np.ndarray], np.ndarray]


def check_mesh(mesh) -> None:
  """Raise unless ``mesh`` is None or a ``Mesh`` with the axes the sharding rules use."""
  if mesh is None:
    return
  if not isinstance(mesh, Mesh) or not set(AXES) <= set(mesh.axis_names):
    got = f"axes {tuple(mesh.axis_names)}" if isinstance(mesh, Mesh) else type(mesh).__name__
    raise ValueError(f"mesh must be a jax.sharding.Mesh with axes {AXES}, got {got}; build one with "
                     "make_mesh((data, fsdp, tensor)) from jlora.train.")


def sharding_for(source: ParamSource, mesh: Mesh) -> NamedSharding:
  """The parameter's ``NamedSharding`` on ``mesh`` by the model sharding rules (``param_spec``)."""
  return NamedSharding(mesh, param_spec(source.path, source.shape, mesh))


def place(source: ParamSource, dtype, sharding: Sharding | None = None,
          transform: Transform | None = None) -> jax.Array:
  """``source`` as one array laid out by ``sharding`` (None: the default device, uncommitted).

  Each device's block is read once; devices holding the same block (replicas)
  share the host copy.
  """
  def block(index) -> np.ndarray:
    value = source.read(index, dtype)
    return value if transform is None else transform(source, value)

  if sharding is None:
    return jax.device_put(block(tuple(slice(None) for _ in source.shape)))
  cache: dict = {}

  def callback(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:
      cache[key] = block(index)
    return cache[key]

  return jax.make_array_from_callback(tuple(source.shape), sharding, callback)
