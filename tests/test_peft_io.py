"""PEFT adapter directories in and out, with the real PEFT as the oracle (tiny modules).

A tiny torch module and an NNX module with the same attribute names and
weights stand in for a model; their PEFT names then agree.
"""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model as peft_get_peft_model
from safetensors.torch import load_file, save_file

import jlora

IDS = np.array([[1, 4, 7], [0, 9, 3]])


class TorchTiny(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.emb = torch.nn.Embedding(10, 6)
    self.lin = torch.nn.Linear(6, 5)
    self.out = torch.nn.Linear(5, 4)

  def forward(self, ids):
    return self.out(self.lin(self.emb(ids)))


class NnxTiny(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.emb = nnx.Embed(10, 6, rngs=rngs)
    self.lin = nnx.Linear(6, 5, rngs=rngs)
    self.out = nnx.Linear(5, 4, rngs=rngs)

  def __call__(self, ids):
    return self.out(self.lin(self.emb(ids)))


class TorchConv(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

  def forward(self, x):  # x NHWC, as the NNX twin takes it
    return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class NnxConv(nnx.Module):
  def __init__(self):
    self.conv = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.conv(x)


def torch_base(cls, seed=0):
  torch.manual_seed(seed)
  return cls().eval()


def nnx_twin(torch_model):
  """The NNX module with the torch module's weights."""
  model = {TorchTiny: NnxTiny, TorchConv: NnxConv}[type(torch_model)]()
  for name, value in torch_model.state_dict().items():
    module, leaf = name.rsplit(".", 1)
    target = getattr(model, module)
    value = value.numpy()
    if leaf == "bias":
      target.bias[...] = jnp.asarray(value)
    elif isinstance(target, nnx.Embed):
      target.embedding[...] = jnp.asarray(value)
    elif isinstance(target, nnx.Conv):
      target.kernel[...] = jnp.asarray(value.transpose(2, 3, 1, 0))
    else:
      target.kernel[...] = jnp.asarray(value.T)
  return model


def randomize_lora(peft_model, seed=1):
  """Give every PEFT LoRA tensor random values (B is zero at init)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def torch_out(model, x):
  with torch.no_grad():
    return model(torch.as_tensor(x)).numpy()


def save_peft_adapter(tmp_path, name="a", cls=TorchTiny, seed=1, **config):
  """A real PEFT adapter directory for ``cls`` (base seed 0); returns (dir, peft model)."""
  peft_model = peft_get_peft_model(torch_base(cls), PeftLoraConfig(**config))
  randomize_lora(peft_model, seed)
  out = tmp_path / name
  peft_model.save_pretrained(out)
  return out, peft_model.eval()


# ---- load: PEFT -> jlora --------------------------------------------------------------------------


def test_load_linear_and_embedding_matches_peft(tmp_path):
  adapter, peft_model = save_peft_adapter(tmp_path, r=2, lora_alpha=6, target_modules=["emb", "lin", "out"])
  model = jlora.load_peft(nnx_twin(torch_base(TorchTiny)), adapter)
  np.testing.assert_allclose(model(IDS), torch_out(peft_model, IDS), atol=1e-5)


def test_load_conv_matches_peft(tmp_path):
  adapter, peft_model = save_peft_adapter(tmp_path, cls=TorchConv, r=2, lora_alpha=4, target_modules=["conv"])
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 2)).astype(np.float32)
  model = jlora.load_peft(nnx_twin(torch_base(TorchConv)), adapter)
  np.testing.assert_allclose(model(x), torch_out(peft_model, x), atol=1e-5)


def test_load_rslora_rank_and_alpha_patterns_match_peft(tmp_path):
  adapter, peft_model = save_peft_adapter(
      tmp_path, r=2, lora_alpha=4, use_rslora=True, target_modules=["lin", "out"],
      rank_pattern={"lin": 3}, alpha_pattern={"out": 7})
  model = jlora.load_peft(nnx_twin(torch_base(TorchTiny)), adapter)
  assert model.lin.adapters["default"].rank == 3
  np.testing.assert_allclose(model(IDS), torch_out(peft_model, IDS), atol=1e-5)


def test_two_loaded_adapters_active_together_match_peft(tmp_path):
  first, _ = save_peft_adapter(tmp_path, "first", r=2, target_modules=["lin"], seed=1)
  second, _ = save_peft_adapter(tmp_path, "second", r=3, target_modules=["lin", "out"], seed=2)
  peft_model = PeftModel.from_pretrained(torch_base(TorchTiny), first, adapter_name="first")
  peft_model.load_adapter(second, adapter_name="second")
  peft_model.base_model.set_adapter(["first", "second"])
  model = nnx_twin(torch_base(TorchTiny))
  jlora.load_peft(model, first, adapter_name="first")
  jlora.load_peft(model, second, adapter_name="second")
  jlora.set_adapter(model, ["first", "second"])
  np.testing.assert_allclose(model(IDS), torch_out(peft_model.eval(), IDS), atol=1e-5)


def test_load_saved_embedding_base_weight_into_base_layer(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["emb"])
  tensors = load_file(adapter / "adapter_model.safetensors")
  table = torch.arange(60, dtype=torch.float32).reshape(10, 6) / 60
  tensors["base_model.model.emb.base_layer.weight"] = table
  save_file(tensors, adapter / "adapter_model.safetensors")
  model = jlora.load_peft(nnx_twin(torch_base(TorchTiny)), adapter)
  np.testing.assert_array_equal(model.emb.base_layer.embedding[...], table.numpy())


def test_moslora_fork_checkpoint_imports_mixer_as_its_transpose(tmp_path):
  """The MoSLoRA authors' PEFT fork: ``lora_B(lora_AB(lora_A(x)))`` with ``lora_use_mixer``."""
  gen = torch.Generator().manual_seed(0)
  w_a, w_ab, w_b = (torch.randn(s, generator=gen) for s in ((2, 6), (2, 2), (5, 2)))
  (tmp_path / "mos").mkdir()
  save_file({"base_model.model.lin.lora_A.weight": w_a, "base_model.model.lin.lora_AB.weight": w_ab,
             "base_model.model.lin.lora_B.weight": w_b}, tmp_path / "mos" / "adapter_model.safetensors")
  (tmp_path / "mos" / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"], "lora_dropout": 0.0,
       "lora_use_mixer": True, "merge_weights": False, "fan_in_fan_out": False, "bias": "none"}))
  base = torch_base(TorchTiny)
  h = base.emb(torch.as_tensor(IDS))
  with torch.no_grad():
    want = base.out(base.lin(h) + (h @ w_a.T @ w_ab.T @ w_b.T) * 2.0).numpy()
  model = jlora.load_peft(nnx_twin(base), tmp_path / "mos")
  assert isinstance(jlora.peft_config(model)["default"], jlora.MoSLoraConfig)
  np.testing.assert_allclose(model(IDS), want, atol=1e-5)


# ---- save: jlora -> PEFT --------------------------------------------------------------------------


def jlora_tiny(config, name="default"):
  return jlora.get_peft_model(nnx_twin(torch_base(TorchTiny)), config, name)


def peft_loads_same(model, tmp_path, name="default"):
  out = jlora.save_peft(model, tmp_path / "exported", adapter_name=name)
  peft_model = PeftModel.from_pretrained(torch_base(TorchTiny), out).eval()
  np.testing.assert_allclose(torch_out(peft_model, IDS), model(IDS), atol=1e-5)


def test_save_lora_loads_in_peft_with_same_outputs(tmp_path):
  model = jlora_tiny(jlora.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                      target_modules=["emb", "lin", "out"], rank_pattern={"out": 3}))
  peft_loads_same(model, tmp_path)


def test_save_moslora_exports_plain_lora_with_mixer_folded(tmp_path):
  model = jlora_tiny(jlora.MoSLoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["lin", "out"]))
  peft_loads_same(model, tmp_path)
  config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
  assert "lora_use_mixer" not in config


def test_save_wlora_exports_cat_with_rank_sum(tmp_path):
  model = nnx_twin(torch_base(TorchTiny))
  jlora.add_adapter(model, "u1", jlora.LoraConfig(r=2, init_lora_weights=False, target_modules=["lin"], seed=1))
  jlora.add_adapter(model, "u2", jlora.LoraConfig(r=3, init_lora_weights=False, target_modules=["lin"], seed=2))
  jlora.get_peft_model(model, jlora.WLoraConfig(upstream_loras=["u1", "u2"]), "w")
  model.lin.adapters["w"].logits[...] = jnp.asarray([0.3, -0.5])
  peft_loads_same(model, tmp_path, "w")
  config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"]) == (5, 5)


def test_load_of_saved_adapter_round_trips(tmp_path):
  model = jlora_tiny(jlora.LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=["lin", "out"]))
  jlora.save_peft(model, tmp_path / "rt")
  again = jlora.load_peft(nnx_twin(torch_base(TorchTiny)), tmp_path / "rt")
  np.testing.assert_allclose(again(IDS), model(IDS), atol=1e-6)


def test_get_peft_model_takes_peft_directories_as_wlora_upstreams(tmp_path):
  first, _ = save_peft_adapter(tmp_path, "first", r=2, target_modules=["lin"], seed=1)
  second, _ = save_peft_adapter(tmp_path, "second", r=2, target_modules=["lin"], seed=2)
  model = jlora.get_peft_model(nnx_twin(torch_base(TorchTiny)),
                               jlora.WLoraConfig(upstream_loras=[str(first), str(second)]))
  peft_model = PeftModel.from_pretrained(torch_base(TorchTiny), first, adapter_name="first")
  peft_model.load_adapter(second, adapter_name="second")
  peft_model.add_weighted_adapter(["first", "second"], [0.5, 0.5], "mix", combination_type="cat")
  peft_model.set_adapter("mix")
  np.testing.assert_allclose(model(IDS), torch_out(peft_model.eval(), IDS), atol=1e-5)


def test_save_replaces_an_existing_adapter_dir_leaving_no_temp_files(tmp_path):
  model = jlora_tiny(jlora.LoraConfig(r=2, init_lora_weights=False, target_modules=["lin"]))
  jlora.save_peft(model, tmp_path / "out")
  model.lin.adapters["default"].lora_B[...] = jnp.ones_like(model.lin.adapters["default"].lora_B[...])
  jlora.save_peft(model, tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == ["out"]
  assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
  np.testing.assert_array_equal(load_file(tmp_path / "out" / "adapter_model.safetensors")[
      "base_model.model.lin.lora_B.weight"].numpy(), np.ones((5, 2)))


# ---- bad input: one clear error each ---------------------------------------------------------------


def fresh():
  return nnx_twin(torch_base(TorchTiny))


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    jlora.load_peft(fresh(), tmp_path / "nope")


def test_missing_config_is_named(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  (adapter / "adapter_config.json").unlink()
  with pytest.raises(ValueError, match="no adapter_config.json"):
    jlora.load_peft(fresh(), adapter)


def test_missing_weights_file_is_named(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  (adapter / "adapter_model.safetensors").unlink()
  with pytest.raises(ValueError, match="no adapter_model.safetensors"):
    jlora.load_peft(fresh(), adapter)


def test_pickled_weights_only_are_refused_with_conversion_hint(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
  with pytest.raises(ValueError, match="never unpickles.*save_file"):
    jlora.load_peft(fresh(), adapter)


def test_malformed_json_is_named(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  (adapter / "adapter_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
    jlora.load_peft(fresh(), adapter)


def test_truncated_weights_are_named(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  data = (adapter / "adapter_model.safetensors").read_bytes()
  (adapter / "adapter_model.safetensors").write_bytes(data[:-8])
  with pytest.raises(ValueError, match="truncated"):
    jlora.load_peft(fresh(), adapter)


def edit_tensors(adapter, fn):
  tensors = load_file(adapter / "adapter_model.safetensors")
  fn(tensors)
  save_file(tensors, adapter / "adapter_model.safetensors")


def test_missing_tensor_is_named_and_model_left_unchanged(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin", "out"])
  edit_tensors(adapter, lambda t: t.pop("base_model.model.out.lora_B.weight"))
  model = fresh()
  with pytest.raises(ValueError, match="lacks 1 tensor.*out.lora_B.weight"):
    jlora.load_peft(model, adapter)
  assert jlora.peft_config(model) == {} and isinstance(model.lin, nnx.Linear)


def test_unexpected_tensor_is_named(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  edit_tensors(adapter, lambda t: t.update({"base_model.model.extra.lora_A.weight": torch.zeros(2, 6)}))
  with pytest.raises(ValueError, match="no place for.*extra.lora_A"):
    jlora.load_peft(fresh(), adapter)


def test_rank_mismatch_is_named(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  config = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
  with pytest.raises(ValueError, match=r"lin.lora_A.weight' has shape \(2, 6\).*\(3, 6\)"):
    jlora.load_peft(fresh(), adapter)


def test_target_module_the_model_lacks_is_named(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  config = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
  with pytest.raises(ValueError, match="q_proj.*matches no module"):
    jlora.load_peft(fresh(), adapter)


@pytest.mark.parametrize("field,value", [("use_qalora", True), ("lora_bias", True),
                                         ("trainable_token_indices", [1]), ("init_lora_weights", "loftq"),
                                         ("target_parameters", ["lin.weight"])])
def test_unsupported_peft_feature_is_refused(tmp_path, field, value):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  config = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
  with pytest.raises(ValueError, match=field):
    jlora.load_peft(fresh(), adapter)


def test_non_lora_peft_type_is_refused(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  config = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
  with pytest.raises(ValueError, match="peft_type='IA3'.*only the PEFT types of its registered adapter kinds: 'LORA'"):
    jlora.load_peft(fresh(), adapter)


def test_save_refuses_to_overwrite_a_non_adapter_directory(tmp_path):
  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "notes.txt").write_text("keep me")
  model = jlora_tiny(jlora.LoraConfig(r=2, target_modules=["lin"]))
  with pytest.raises(ValueError, match="not a PEFT adapter; refusing"):
    jlora.save_peft(model, tmp_path / "precious")
  assert os.listdir(tmp_path / "precious") == ["notes.txt"]


def test_save_unknown_adapter_name_is_named(tmp_path):
  model = jlora_tiny(jlora.LoraConfig(r=2, target_modules=["lin"]))
  with pytest.raises(ValueError, match="no adapter 'other'"):
    jlora.save_peft(model, tmp_path / "out", adapter_name="other")


def test_unknown_config_field_with_a_value_is_refused(tmp_path):
  adapter, _ = save_peft_adapter(tmp_path, r=2, target_modules=["lin"])
  config = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**config, "shiny_new_feature": 3}))
  with pytest.raises(ValueError, match="unknown field shiny_new_feature=3"):
    jlora.load_peft(fresh(), adapter)


def test_wlora_upstream_that_is_neither_adapter_nor_directory_is_named(tmp_path):
  with pytest.raises(ValueError, match="'nowhere' is neither an adapter of the model .* nor a PEFT adapter directory"):
    jlora.get_peft_model(fresh(), jlora.WLoraConfig(upstream_loras=["nowhere"]))


def test_loaded_adapter_is_in_inference_mode_unless_trainable(tmp_path):
  adapter, peft_model = save_peft_adapter(tmp_path, r=2, lora_dropout=0.5, target_modules=["lin"])
  model = jlora.load_peft(fresh(), adapter)
  np.testing.assert_allclose(model(IDS), torch_out(peft_model, IDS), atol=1e-5)
  trainable = jlora.load_peft(fresh(), adapter, is_trainable=True)
  assert not np.allclose(trainable(IDS), torch_out(peft_model, IDS), atol=1e-3)
