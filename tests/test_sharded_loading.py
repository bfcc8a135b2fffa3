"""Sharded loading: each device gets only its block of each tensor, read straight from the files.

The mesh runs use 8 simulated CPU devices in one subprocess
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before
jax starts); it measures everything once and the tests below each check one
behaviour of the numbers. Tolerance: float32 logits within 1e-5 of the
unsharded load (sharded matmuls reduce in another order).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from jlora.io._placement import ParamSource

ROOT = Path(__file__).parent.parent
MESHES = {"2x2x2": (2, 2, 2), "1x8x1": (1, 8, 1)}

PROBE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import jlora
from flax import nnx
from jlora.io import _placement
from jlora.models._sharding import param_spec
from jlora.train import make_mesh

model_dir, adapter_dir, run_dir, meshes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
reads = []
read_block = _placement.read_block
def counting_read_block(tensor, index, transpose, dtype):
  out = read_block(tensor, index, transpose, dtype)
  reads.append(out.nbytes)
  return out
_placement.read_block = counting_read_block

ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)), jnp.int32)
whole = jlora.from_pretrained(model_dir, dtype=jnp.float32)
want = np.asarray(whole(ids))
jlora.load_peft(whole, adapter_dir)
want_adapted = np.asarray(whole(ids))
params = dict(nnx.to_flat_state(nnx.state(whole, nnx.Param)))
model_bytes = sum(v[...].nbytes for p, v in params.items() if "lora_A" not in p and "lora_B" not in p)
largest = max(v[...].nbytes for v in params.values())
out = {"model_bytes": model_bytes, "largest": largest}
for name, shape in meshes.items():
  mesh = make_mesh(tuple(shape))
  reads.clear()
  model = jlora.from_pretrained(model_dir, dtype=jnp.float32, mesh=mesh)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  held = {str(d): 0 for d in jax.devices()}
  share = 0
  for path, v in flat.items():
    x = v[...]
    for s in x.addressable_shards:
      held[str(s.device)] += s.data.nbytes
    spec = param_spec(path, x.shape, mesh)
    axes = [a for dim in spec if dim is not None for a in (dim if isinstance(dim, tuple) else (dim,))]
    share += x.nbytes // int(np.prod([mesh.shape[a] for a in axes]))
  r = {"held": held, "share": share, "read_total": sum(reads), "read_max": max(reads),
       "logits_diff": float(np.max(np.abs(np.asarray(model(ids)) - want)))}
  bf16 = jlora.from_pretrained(model_dir, dtype=jnp.bfloat16, mesh=mesh)
  r["bf16"] = sorted({str(v[...].dtype) for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param))})
  jlora.load_peft(model, adapter_dir)
  q = model.model.layers.self_attn.q_proj
  spec = lambda x: [str(a) for a in tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))]
  r["kernel_spec"] = spec(q.base_layer.kernel[...])
  r["a_spec"] = spec(q.adapters["default"].lora_A[...])
  r["b_spec"] = spec(q.adapters["default"].lora_B[...])
  r["adapted_diff"] = float(np.max(np.abs(np.asarray(model(ids)) - want_adapted)))
  out[name] = r

from jlora.train import ByteTokenizer, TrainConfig, train
reads.clear()
cfg = TrainConfig().replace(**{"output_dir": run_dir, "model.name": model_dir, "model.dtype": "float32",
    "data.tokenizer": "bytes", "data.seq_len": 16, "steps": 2, "batch_size": 8, "eval_batches": 1,
    "checkpoint.async_save": False, "progress": False, "samples": 0, "mesh.data": 1, "mesh.fsdp": 8})
result = train(cfg)
out["train"] = {"read_total": sum(reads), "read_max": max(reads), "losses": result.losses}
print("PROBE" + json.dumps(out))
"""


def _checkpoint(tmp_path) -> tuple[Path, Path]:
  """A tiny Llama (every sharded dim divides 8) and a PEFT adapter for it, saved by jlora."""
  import jax.numpy as jnp

  import jlora
  from jlora import testing

  config = transformers.LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "llama"))
  model = jlora.from_pretrained(tmp_path / "llama", dtype=jnp.float32)
  jlora.get_peft_model(model, jlora.LoraConfig(r=4, target_modules="all-linear"))
  testing.randomize_adapters(model)
  jlora.save_peft(model, tmp_path / "adapter")
  return tmp_path / "llama", tmp_path / "adapter"


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sharded")
  model_dir, adapter_dir = _checkpoint(tmp)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), str(adapter_dir), str(tmp / "run"),
                         json.dumps(MESHES)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("PROBE")][-1][len("PROBE"):])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_exactly_its_share(probe, mesh):
  held = probe[mesh]["held"]
  assert len(held) == 8
  assert set(held.values()) == {probe[mesh]["share"]}


@pytest.mark.slow
def test_fsdp_over_eight_devices_leaves_each_about_an_eighth(probe):
  assert probe["1x8x1"]["share"] < probe["model_bytes"] / 8 * 1.05


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_logits_equal_an_unsharded_load(probe, mesh):
  assert probe[mesh]["logits_diff"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_every_byte_is_read_once_replicas_share_one_read(probe, mesh):
  assert probe[mesh]["read_total"] == probe["model_bytes"]


@pytest.mark.slow
def test_no_read_is_larger_than_a_devices_block(probe):
  # fsdp=8 splits every weight matrix eight ways; only the tiny norm scales are read whole.
  assert probe["1x8x1"]["read_max"] <= probe["largest"] // 8


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_blocks_are_converted_to_the_param_dtype(probe, mesh):
  assert probe[mesh]["bf16"] == ["bfloat16"]


@pytest.mark.slow
def test_load_peft_places_factors_like_their_kernel(probe):
  r = probe["2x2x2"]
  assert r["kernel_spec"] == ["None", "fsdp", "tensor"]
  assert (r["a_spec"], r["b_spec"]) == (["None", "fsdp", "None"], ["None", "None", "tensor"])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_adapter_loaded_into_a_sharded_model_gives_the_unsharded_logits(probe, mesh):
  assert probe[mesh]["adapted_diff"] <= 1e-5


@pytest.mark.slow
def test_train_with_a_mesh_loads_the_checkpoint_shard_by_shard(probe):
  assert probe["train"]["read_total"] == probe["model_bytes"]
  assert probe["train"]["read_max"] <= probe["largest"] // 8
  assert len(probe["train"]["losses"]) == 2


def test_a_stacked_transposed_block_is_read_from_the_per_layer_tensors():
  layers = [np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * i for i in range(3)]  # HF [out=3, in=4]
  source = ParamSource(("layers", "kernel"), ("l0", "l1", "l2"), tuple(layers), transpose=True, stacked=True,
                       shape=(3, 4, 3))
  whole = np.stack([w.T for w in layers])
  index = (slice(1, 3), slice(2, 4), slice(None))
  np.testing.assert_array_equal(source.read(index, np.float32), whole[index])


@pytest.mark.parametrize("mesh", [(1, 8, 1), "mesh"])
def test_a_mesh_that_is_not_a_jlora_mesh_is_one_clear_error(tmp_path, mesh):
  import jlora

  with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with axes \('data', 'fsdp', 'tensor'\)"):
    jlora.from_pretrained(tmp_path, mesh=mesh)


def test_a_mesh_without_the_rule_axes_is_refused(tmp_path):
  import jax
  import numpy as np
  from jax.sharding import Mesh

  import jlora

  with pytest.raises(ValueError, match=r"got axes \('x',\)"):
    jlora.from_pretrained(tmp_path, mesh=Mesh(np.asarray(jax.devices()[:1]), ("x",)))
