"""Bad input to checkpoint I/O: foreign data is never overwritten, nothing is left half-written,
NaN/inf in loaded tensors and malformed configs get one clear error naming the problem."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import testing
from jlora.io import _safetensors
from tests import hf_doubles


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "llama"
  hf_doubles.save("llama", path)
  return path


@pytest.fixture(scope="module")
def model(llama_dir):
  return jlora.from_pretrained(llama_dir, dtype=jnp.float32)


def lora_model():
  model = testing.TinyLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  return model


def denied(*args, **kwargs):
  raise PermissionError(13, "Permission denied", "/readonly/model.safetensors")


# ---- save_pretrained: whose directory is it? ---------------------------------------

@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_save_pretrained_refuses_a_checkpoint_it_did_not_write(model, tmp_path, name):
  (tmp_path / name).write_text("the user's data")
  with pytest.raises(ValueError, match=f"holds a checkpoint jlora did not write \\({name}\\).*overwrite=True"):
    jlora.save_pretrained(model, tmp_path)
  assert (tmp_path / name).read_text() == "the user's data"


def test_save_pretrained_overwrites_a_foreign_checkpoint_with_overwrite_true(model, tmp_path):
  (tmp_path / "config.json").write_text("{}")
  jlora.save_pretrained(model, tmp_path, overwrite=True)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_save_pretrained_replaces_its_own_checkpoint(model, tmp_path):
  jlora.save_pretrained(model, tmp_path)
  jlora.save_pretrained(model, tmp_path)
  assert (tmp_path / "model.safetensors").is_file()


def test_save_pretrained_keeps_unrelated_files_beside_the_checkpoint(model, tmp_path):
  (tmp_path / "tokenizer.json").write_text("{}")
  jlora.save_pretrained(model, tmp_path)
  assert (tmp_path / "tokenizer.json").read_text() == "{}"


def test_save_pretrained_into_an_existing_file_names_it(model, tmp_path):
  (tmp_path / "out").write_text("")
  with pytest.raises(ValueError, match="out_dir '.*out' is an existing file, not a directory"):
    jlora.save_pretrained(model, tmp_path / "out")


def test_save_pretrained_permission_error_names_the_path_and_the_fix(model, tmp_path, monkeypatch):
  monkeypatch.setattr(_safetensors, "write", denied)
  with pytest.raises(PermissionError, match="Cannot write the model to '.*out': permission denied.*chmod"):
    jlora.save_pretrained(model, tmp_path / "out")


def test_failed_save_pretrained_leaves_no_temp_file(model, tmp_path, monkeypatch):
  def fail_rename(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(_safetensors.os, "replace", fail_rename)
  with pytest.raises(OSError, match="disk full"):
    jlora.save_pretrained(model, tmp_path)
  assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---- save_peft ------------------------------------------------------------------------

def test_failed_save_peft_over_an_adapter_leaves_no_old_dir_and_keeps_the_adapter(tmp_path, monkeypatch):
  model = lora_model()
  jlora.save_peft(model, tmp_path / "adapter")
  saved = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
  real = _safetensors.os.replace
  calls = []

  def fail_second_rename(src, dst):
    calls.append(dst)
    if str(dst).endswith("adapter") and len([c for c in calls if str(c).endswith("adapter")]) == 2:
      raise OSError("rename failed")
    real(src, dst)

  monkeypatch.setattr("jlora.io._peft_save.os.replace", fail_second_rename)
  with pytest.raises(OSError, match="rename failed"):
    jlora.save_peft(model, tmp_path / "adapter")
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
  assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == saved


def test_save_peft_permission_error_names_the_path_and_the_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(_safetensors, "write", denied)
  with pytest.raises(PermissionError, match="Cannot write the adapter to '.*adapter': permission denied"):
    jlora.save_peft(lora_model(), tmp_path / "adapter")
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_save_peft_into_an_existing_file_names_it(tmp_path):
  (tmp_path / "adapter").write_text("")
  with pytest.raises(ValueError, match="out_dir '.*adapter' is an existing file"):
    jlora.save_peft(lora_model(), tmp_path / "adapter")


# ---- NaN / inf in loaded tensors -----------------------------------------------------------

def test_nan_in_base_weights_names_the_tensor(llama_dir, tmp_path):
  tensors = {k: np.array(v) for k, v in _safetensors.read(llama_dir / "model.safetensors").items()}
  tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
  (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
  _safetensors.write(tensors, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="tensor 'model.layers.1.mlp.up_proj.weight' holds NaN or inf"):
    jlora.from_pretrained(tmp_path)


def test_inf_in_adapter_weights_names_the_tensor(tmp_path):
  jlora.save_peft(lora_model(), tmp_path)
  tensors = {k: np.array(v) for k, v in _safetensors.read(tmp_path / "adapter_model.safetensors").items()}
  key = sorted(tensors)[0]
  tensors[key][0, 0] = np.inf
  _safetensors.write(tensors, tmp_path / "adapter_model.safetensors")
  with pytest.raises(ValueError, match=f"tensor '{key}' holds NaN or inf"):
    jlora.load_peft(testing.TinyLM(), tmp_path)


# ---- malformed configs and paths ----------------------------------------------------------

def test_heads_that_do_not_divide_the_hidden_size_are_named(llama_dir, tmp_path):
  config = json.loads((llama_dir / "config.json").read_text())
  config.update(num_attention_heads=3, num_key_value_heads=3)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="hidden size 16 is not a multiple of the 3 attention heads"):
    jlora.from_pretrained(tmp_path)


def test_kv_heads_that_do_not_divide_the_heads_are_named(llama_dir, tmp_path):
  config = json.loads((llama_dir / "config.json").read_text())
  config.update(num_attention_heads=4, num_key_value_heads=3)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="4 attention heads are not a multiple of the 3 key/value heads"):
    jlora.from_pretrained(tmp_path)


def test_a_checkpoint_path_that_is_a_file_points_at_its_directory(llama_dir):
  with pytest.raises(ValueError, match="is a file; pass the directory that holds config.json"):
    jlora.from_pretrained(llama_dir / "model.safetensors")


def test_an_adapter_path_that_is_a_file_points_at_its_directory(tmp_path):
  jlora.save_peft(lora_model(), tmp_path)
  with pytest.raises(ValueError, match="is a file; pass the directory that holds adapter_config.json"):
    jlora.load_peft(testing.TinyLM(), tmp_path / "adapter_model.safetensors")


# ---- model calls ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [hf_doubles.VOCAB, -1])
def test_generate_refuses_token_ids_outside_the_vocabulary(model, bad):
  with pytest.raises(ValueError, match=rf"outside the model's vocabulary \[0, {hf_doubles.VOCAB}\)"):
    jlora.generate(model, jnp.asarray([[1, bad]]), max_new_tokens=1)

