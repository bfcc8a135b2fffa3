"""Sharding: mesh checks, where params and adapters live, and sharded runs equal a 1-device run.

The multi-device runs use 8 simulated CPU devices in a subprocess
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before
jax starts). Tolerance: per-step losses within 1e-4 (absolute) of the
single-device run; sharded float32 reductions sum in another order, so the
runs are close but not bitwise equal.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jax.sharding import PartitionSpec as P

from jlora.train import MeshError, param_spec
from jlora.train._sharding import gathered_spec, resolve_mesh_shape

TESTS = Path(__file__).parent
MESH = SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 4})


def path(*keys):
  return tuple(SimpleNamespace(key=k) for k in keys)


def test_data_minus_one_takes_the_remaining_devices():
  assert resolve_mesh_shape(-1, 2, 2, batch_size=8, num_devices=8) == (2, 2, 2)


def test_mesh_that_does_not_match_the_devices_is_refused():
  with pytest.raises(MeshError, match=r"has 12 devices but 8 are available"):
    resolve_mesh_shape(3, 2, 2, batch_size=12, num_devices=8)


def test_batch_not_divisible_by_the_data_axes_is_refused():
  with pytest.raises(MeshError, match=r"batch_size=6 is not divisible by data\*fsdp=4"):
    resolve_mesh_shape(2, 2, 2, batch_size=6, num_devices=8)


def test_projection_in_is_fsdp_by_tensor_and_stack_dim_replicated():
  spec = param_spec(path("model", "layers", "self_attn", "q_proj", "kernel"), (2, 16, 16), MESH)
  assert spec == P(None, "fsdp", "tensor")


def test_row_parallel_kernel_splits_its_in_side_over_tensor_then_fsdp():
  assert param_spec(path("mlp", "down_proj", "kernel"), (32, 16), MESH) == P(("tensor", "fsdp"), None)


def test_row_parallel_kernel_takes_fsdp_on_its_out_side_when_the_in_side_is_full():
  assert param_spec(path("self_attn", "o_proj", "kernel"), (12, 16), MESH) == P("tensor", "fsdp")


def test_adapter_factors_follow_their_base_layer_and_also_split_over_fsdp():
  base = ("model", "layers", "self_attn", "q_proj")
  a = param_spec(path(*base, "adapters", "default", "lora_A"), (2, 16, 4), MESH)
  b = param_spec(path(*base, "adapters", "default", "lora_B"), (2, 4, 16), MESH)
  kernel = param_spec(path(*base, "base_layer", "kernel"), (2, 16, 16), MESH)
  assert (a, b, kernel) == (P(None, "fsdp", None), P(None, None, ("tensor", "fsdp")), P(None, "fsdp", "tensor"))


def test_adapter_factor_keeps_its_base_axis_when_fsdp_does_not_divide_too():
  b = param_spec(path("mlp", "up_proj", "adapters", "default", "lora_B"), (4, 12), MESH)
  assert b == P(None, "tensor")


def test_gathered_spec_drops_only_fsdp():
  base = ("model", "layers", "mlp", "down_proj")
  assert gathered_spec(path(*base, "base_layer", "kernel"), (32, 16), MESH) == P("tensor", None)
  assert gathered_spec(path(*base, "base_layer", "kernel"), (12, 16), MESH) == P("tensor", None)
  assert gathered_spec(path(*base, "adapters", "default", "lora_A"), (32, 4), MESH) == P("tensor", None)


def test_dims_the_axis_does_not_divide_are_replicated():
  assert param_spec(path("lm_head", "kernel"), (16, 258), MESH) == P("fsdp", None)


def test_norms_are_replicated():
  assert param_spec(path("model", "norm", "scale"), (16,), MESH) == P(None)


def test_a_matrix_no_rule_names_splits_its_larger_side_over_fsdp():
  assert param_spec(path("model", "mystery", "kernel"), (3, 8, 32), MESH) == P(None, None, "fsdp")


JOB = """
import json, sys
sys.path.insert(0, {tests!r})
from train_doubles import run_tiny_job
out = {{}}
for mesh in {meshes!r}:
  d, f, t = mesh
  r = run_tiny_job({root!r} + "/" + "x".join(map(str, mesh)), steps=6, batch_size=8,
                   **{{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t, "eval_every": 3}})
  out["x".join(map(str, mesh))] = r.losses + [l for _, l in r.eval_losses]
print("LOSSES" + json.dumps(out))
"""


def _run(root, meshes, devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.run([sys.executable, "-c", JOB.format(tests=str(TESTS), meshes=meshes, root=str(root))],
                        env=env, capture_output=True, text=True, timeout=540)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("LOSSES")][-1]
  return json.loads(line[len("LOSSES"):])


@pytest.mark.slow
def test_sharded_runs_match_the_single_device_run(tmp_path):
  single = _run(tmp_path / "one", [(1, 1, 1)], devices=1)["1x1x1"]
  sharded = _run(tmp_path / "eight", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], devices=8)
  assert len(single) == 6 + 3
  for mesh, losses in sharded.items():
    assert losses == pytest.approx(single, abs=1e-4), mesh
