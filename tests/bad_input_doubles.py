"""Helpers for the bad-input tests: a model's full snapshot, to prove a failed call changed nothing."""

from __future__ import annotations

import numpy as np
from flax import nnx


def snapshot(model: nnx.Module):
  """``(graphdef, {path: array copy})``: the module tree, its static attributes and every array."""
  graphdef, state = nnx.split(model)
  arrays = {path: np.array(v[...]) for path, v in nnx.to_flat_state(state)}
  return graphdef, arrays


def assert_unchanged(model: nnx.Module, before) -> None:
  graphdef, arrays = snapshot(model)
  assert graphdef == before[0], "the model's structure changed"
  assert arrays.keys() == before[1].keys()
  for path, value in arrays.items():
    np.testing.assert_array_equal(value, before[1][path], err_msg=str(path))
