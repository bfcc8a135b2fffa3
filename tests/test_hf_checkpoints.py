"""HF checkpoint directories: save_pretrained round trips and one clear error per bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jlora
from jlora import testing
from jlora.io import _safetensors
from tests import hf_doubles

TOL = 1e-4


@pytest.fixture
def llama_dir(tmp_path):
  hf_doubles.save("llama", tmp_path / "llama")
  return tmp_path / "llama"


def edit_weights(model_dir, edit):
  tensors = {k: np.array(v) for k, v in _safetensors.read(model_dir / "model.safetensors").items()}
  edit(tensors)
  _safetensors.write(tensors, model_dir / "model.safetensors")


def hf_reload_logits(out_dir, ids):
  return hf_doubles.logits(transformers.AutoModelForCausalLM.from_pretrained(str(out_dir)).eval(), ids)


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "qwen3", "gpt2"])
def test_save_pretrained_round_trips_through_transformers(family, tmp_path):
  hf_doubles.save(family, tmp_path / "in")
  model = jlora.from_pretrained(tmp_path / "in", dtype=jnp.float32)
  jlora.save_pretrained(model, tmp_path / "out")
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(hf_reload_logits(tmp_path / "out", ids), model(jnp.asarray(ids)), atol=TOL, rtol=0)


def test_save_pretrained_writes_hf_names_and_layouts(llama_dir, tmp_path):
  jlora.save_pretrained(jlora.from_pretrained(llama_dir, dtype=jnp.float32), tmp_path / "out")
  ours = _safetensors.read(tmp_path / "out" / "model.safetensors")
  theirs = _safetensors.read(llama_dir / "model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name])


def test_merged_lora_model_saves_with_the_adapted_logits(llama_dir, tmp_path):
  model = jlora.from_pretrained(llama_dir, dtype=jnp.float32)
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
  testing.randomize_adapters(model, scale=0.5)
  ids, _ = hf_doubles.batch()
  adapted = np.asarray(model(jnp.asarray(ids)))
  jlora.save_pretrained(jlora.merge_and_unload(model), tmp_path / "out")
  np.testing.assert_allclose(hf_reload_logits(tmp_path / "out", ids), adapted, atol=TOL, rtol=0)


def test_save_pretrained_refuses_unmerged_lora(llama_dir, tmp_path):
  model = jlora.get_peft_model(jlora.from_pretrained(llama_dir, dtype=jnp.float32),
                               jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  with pytest.raises(ValueError, match="merge_and_unload"):
    jlora.save_pretrained(model, tmp_path / "out")
  assert not (tmp_path / "out" / "model.safetensors").exists()


def test_save_pretrained_replaces_a_stale_sharded_checkpoint(tmp_path):
  hf_doubles.save("llama", tmp_path / "d", max_shard_size="20KB")
  model = jlora.from_pretrained(tmp_path / "d", dtype=jnp.float32)
  jlora.save_pretrained(model, tmp_path / "d", overwrite=True)
  assert not (tmp_path / "d" / "model.safetensors.index.json").exists()
  assert sorted(p.name for p in (tmp_path / "d").glob("*.safetensors")) == ["model.safetensors"]


def test_bfloat16_params_load_and_save(llama_dir, tmp_path):
  model = jlora.from_pretrained(llama_dir)
  assert model.model.embed_tokens.embedding.dtype == jnp.bfloat16
  jlora.save_pretrained(model, tmp_path / "out")
  again = jlora.from_pretrained(tmp_path / "out", dtype=jnp.float32)
  np.testing.assert_array_equal(again.lm_head.kernel[...], model.lm_head.kernel[...].astype(jnp.float32))


# ---- bad input: one clear error each ------------------------------------


def test_missing_directory(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    jlora.from_pretrained(tmp_path / "nope")


def test_missing_config_json(llama_dir):
  (llama_dir / "config.json").unlink()
  with pytest.raises(ValueError, match="no config.json"):
    jlora.from_pretrained(llama_dir)


def test_malformed_config_json(llama_dir):
  (llama_dir / "config.json").write_text('{"model_type": "llama",')
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    jlora.from_pretrained(llama_dir)


def test_unknown_model_type(llama_dir):
  config = json.loads((llama_dir / "config.json").read_text())
  (llama_dir / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type='bert'.*supported model types: llama, mistral"):
    jlora.from_pretrained(llama_dir)


def test_missing_safetensors(llama_dir):
  (llama_dir / "model.safetensors").unlink()
  with pytest.raises(ValueError, match="no model.safetensors"):
    jlora.from_pretrained(llama_dir)


def test_truncated_safetensors(llama_dir):
  path = llama_dir / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match="model.safetensors is truncated"):
    jlora.from_pretrained(llama_dir)


def test_tensor_bytes_that_do_not_fit_the_shape(llama_dir):
  path = llama_dir / "model.safetensors"
  raw = path.read_bytes()
  path.write_bytes(raw.replace(b'"shape":[61,16]', b'"shape":[62,16]', 1))
  with pytest.raises(ValueError, match="does not fit its shape.*corrupt"):
    jlora.from_pretrained(llama_dir)


def test_missing_shard(tmp_path):
  hf_doubles.save("llama", tmp_path, max_shard_size="20KB")
  next(tmp_path.glob("model-00002-*.safetensors")).unlink()
  with pytest.raises(ValueError, match="Shard .* is missing"):
    jlora.from_pretrained(tmp_path)


def test_missing_key(llama_dir):
  edit_weights(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match="lacks 1 weight.*model.layers.1.mlp.up_proj.weight"):
    jlora.from_pretrained(llama_dir)


def test_unexpected_key(llama_dir):
  edit_weights(llama_dir, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((24, 16), np.float32)}))
  with pytest.raises(ValueError, match="does not use.*model.layers.2.mlp.up_proj.weight"):
    jlora.from_pretrained(llama_dir)


def test_shape_mismatch(llama_dir):
  edit_weights(llama_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 16), np.float32)}))
  with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(16, 16\) but config.json implies \(8, 16\)"):
    jlora.from_pretrained(llama_dir)


def test_pytorch_bin_only_is_never_unpickled(llama_dir):
  (llama_dir / "model.safetensors").unlink()
  (llama_dir / "pytorch_model.bin").write_bytes(b"not a pickle, and never read as one")
  with pytest.raises(ValueError, match="pytorch_model.bin.*never unpickles.*safe_serialization=True"):
    jlora.from_pretrained(llama_dir)
