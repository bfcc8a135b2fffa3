"""Quantize while loading onto a mesh: ``from_pretrained(mesh=..., quantize="nf4" | "fp8")``.

Runs in a subprocess with 4 simulated CPU devices (``XLA_FLAGS`` must be set
before jax starts). Tolerance: float32 logits within 1e-5 of the unsharded
quantized load (same quantized weights; sharded matmuls reduce in another order).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hf_doubles

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent

PROBE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import jlora
from jlora.quant import QuantizedWeight
from jlora.train import make_mesh

options = {"block_size": 8}
ids = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 7)), jnp.int32)
whole = jlora.from_pretrained(sys.argv[1], dtype=jnp.float32, quantize="nf4", quantize_options=options)
sharded = jlora.from_pretrained(sys.argv[1], dtype=jnp.float32, mesh=make_mesh((1, 2, 2)), quantize="nf4",
                                quantize_options=options)
flat = lambda m: [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(m, QuantizedWeight))]
same = all(np.array_equal(a, b) for a, b in zip(flat(whole), flat(sharded), strict=True))
devices = {len(v[...].sharding.device_set) for _, v in nnx.to_flat_state(nnx.state(sharded, QuantizedWeight))}
diff = float(np.abs(np.asarray(sharded(ids)) - np.asarray(whole(ids))).max())


def fp8(mesh=None):  # q/k/v and gate/up share one fp8 cast and a GEMM over concatenated kernels
  model = jlora.from_pretrained(sys.argv[1], dtype=jnp.float32, mesh=mesh, quantize="fp8")
  return jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj", "up_proj"],
                                                      init_lora_weights=False))


fp8_diff = float(np.abs(np.asarray(fp8(make_mesh((1, 2, 2)))(ids)) - np.asarray(fp8()(ids))).max())
print("RESULT " + json.dumps({"same": same, "devices": sorted(devices), "diff": diff, "fp8_diff": fp8_diff}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("sharded") / "model"
  hf_doubles.save("llama", model_dir)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run([sys.executable, "-c", PROBE, str(model_dir)], capture_output=True, text=True,
                        env=env, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_sharded_quantized_load_stores_the_same_quantized_weights(probe):
  assert probe["same"]


def test_sharded_quantized_load_places_the_quantized_arrays_on_the_mesh(probe):
  assert probe["devices"] == [4]


def test_sharded_quantized_load_gives_the_same_logits(probe):
  assert probe["diff"] <= 1e-5


def test_sharded_fp8_base_with_shared_casts_gives_the_same_logits(probe):
  # the kernels of q/k/v (gate/up) are split over "tensor" and concatenated for one GEMM
  assert probe["fp8_diff"] <= 1e-5
