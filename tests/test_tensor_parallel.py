"""Tensor parallelism (Megatron-style): same logits and loss as one device, less memory per device.

q/k/v/gate/up are split by columns, o/down by rows over the ``tensor`` axis
(heads and GQA kv heads split whole); adapters follow their base layer. Runs
on 8 simulated CPU devices (``mesh_doubles``); tolerance 1e-4 on logits of
magnitude about 1 (float32, sums in another order) and 1e-5 on the loss.
"""

import pytest

from mesh_doubles import compiled_memory, on_8_devices
from jlora.train import MeshError
from jlora.train._memory import Arch
from jlora.train._memory_fit import check_tensor_split

MESHES = [(1, 1, 2), (1, 1, 4), (1, 2, 2)]


@pytest.fixture(scope="module")
def parity():
  return on_8_devices("logits", MESHES)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x1x2", "1x1x4", "1x2x2"])
def test_logits_match_the_single_device_model(parity, mesh):
  assert parity[mesh]["logits"] < 1e-4
  assert parity[mesh]["scale"] > 0.1  # the comparison is not between zeros


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1x1x2", "1x1x4", "1x2x2"])
def test_train_step_loss_matches_the_single_device_step(parity, mesh):
  assert parity[mesh]["loss"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_per_device_memory_falls_with_the_tensor_axis(n):
  one, split = compiled_memory()["1x1x1/matmuls"], compiled_memory()[f"1x1x{n}/matmuls"]
  assert split["argument"] < 1.3 * one["argument"] / n
  assert split["temp"] < one["temp"]


def test_kv_heads_that_the_tensor_axis_does_not_divide_are_refused():
  arch = Arch(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=4, head_dim=16)
  with pytest.raises(MeshError, match=r"mesh.tensor=8 does not divide the model's num_key_value_heads=4.*"
                                      r"Use mesh.tensor in \[2, 4\]"):
    check_tensor_split(arch, 8)
