"""The adapter-kind registry: a kind registered from here works end to end like a built-in one."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import testing
from jlora.io import read_adapter
from jlora.train._optimizer import loraplus_groups
from jlora.nn import AdapterModule, LoraBuffer, LoraParam, PeftFormat


@dataclasses.dataclass(frozen=True)
class GatedConfig:
  """A toy kind: LoRA with a trainable gate per rank, ``delta = ((x·A) ⊙ g)·B``."""

  r: int = 2
  target_modules: tuple = ("q_proj", "v_proj")
  seed: int = 0

  def rank_for(self, name):
    return self.r

  def scaling_for(self, name):
    return 1.0


class GatedAdapter(AdapterModule):

  def __init__(self, a, b, gate, scaling):
    self.gated_A = LoraParam(a)
    self.gated_B = LoraParam(b)
    self.gate = LoraParam(gate)
    self.scaling = LoraBuffer(jnp.asarray(scaling, jnp.float32))

  @property
  def rank(self):
    return self.gated_A.shape[-1]

  def live_ranks(self):
    return np.where(np.ravel(np.asarray(self.scaling[...])) != 0, self.rank, 0)

  def delta(self, ops, x, dtype, *, dropout=True):
    h = ops.project_in(x, self.gated_A[...].astype(dtype)) * self.gate[...].astype(dtype)
    return ops.project_out(h, self.gated_B[...].astype(dtype)) * self.scaling[...].astype(dtype)

  def lora_factors(self, ops):
    return self.gated_A[...] * self.gate[...][..., None, :], self.gated_B[...], self.scaling[...]


def build_gated(layer, key, ranks, scalings, config, *, targets):
  a_shape, b_shape = layer.factor_shapes(config.r)
  stack = layer.stack_shape
  ka, kb = jax.random.split(key)
  return GatedAdapter(jax.random.normal(ka, stack + a_shape) * 0.3, jax.random.normal(kb, stack + b_shape) * 0.3,
                      jnp.ones(stack + (config.r,)), np.reshape(np.asarray(scalings, np.float32), stack))


def gated_to_peft(config, target_modules, ranks, fan_in_fan_out):
  return {"peft_type": "GATED", "r": config.r, "target_modules": sorted(target_modules)}


def gated_from_peft(raw):
  return GatedConfig(r=raw["r"], target_modules=tuple(raw["target_modules"]))


@pytest.fixture
def gated_kind():
  kind = jlora.register_adapter_kind(
      "Gated", GatedConfig, GatedAdapter, build=build_gated,
      roles={"gated_A": "A", "gated_B": "B", "gate": "vector"},
      peft=PeftFormat("GATED", gated_to_peft, gated_from_peft,
                      tensors={"gated_A": None, "gated_B": None, "gate": "lora_gate"}))
  yield kind
  jlora.nn.unregister_adapter_kind("Gated")


def gated_model():
  model = testing.TinyLM()
  jlora.get_peft_model(model, GatedConfig())
  return model


def test_a_registered_kind_injects_and_changes_the_output(gated_kind):
  base = np.asarray(testing.TinyLM()(testing.token_ids()))
  model = gated_model()
  layer = model.model.layers[0].self_attn.q_proj
  assert jlora.nn.kind_of(layer.adapters["default"]) is gated_kind
  assert np.abs(np.asarray(model(testing.token_ids())) - base).max() > 1e-4


def test_a_registered_kind_merges_and_unmerges_exactly(gated_kind):
  model = gated_model()
  ids = testing.token_ids()
  kernel = np.asarray(model.model.layers[0].self_attn.q_proj.base_layer.kernel[...]).copy()
  expected = np.asarray(model(ids))
  jlora.merge_adapter(model)
  np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-5)
  jlora.unmerge_adapter(model)
  np.testing.assert_allclose(np.asarray(model.model.layers[0].self_attn.q_proj.base_layer.kernel[...]), kernel,
                             atol=1e-6)


def test_a_registered_kind_round_trips_through_its_declared_peft_format(gated_kind, tmp_path):
  model = gated_model()
  for _, layer in jlora.lora_layers(model):
    layer.adapters["default"].gate[...] = jnp.asarray([0.5, -2.0])
  out = jlora.save_peft(model, tmp_path / "gated")
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["peft_type"] == "GATED"
  keys = set(read_adapter(out)[1])
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_gate" in keys
  loaded = jlora.load_peft(testing.TinyLM(), out)
  ids = testing.token_ids()
  np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), atol=1e-6)


def test_a_registered_kind_trains_its_roles_and_loraplus_reads_them(gated_kind):
  model = gated_model()
  groups = dict(nnx.to_flat_state(loraplus_groups(model)))
  by_attr = {path[-1] if path[-1] != "value" else path[-2]: g for path, g in groups.items()}
  assert by_attr["gated_A"] == "A" and by_attr["gated_B"] == "B" and by_attr["gate"] == "B"
  tx = jlora.adapter_optimizer(model, optax.sgd(0.1))
  _, params, _ = jlora.split_adapter(model)
  assert tx.init(params) is not None


def test_a_kind_with_an_unknown_role_is_refused():
  with pytest.raises(ValueError, match="unknown roles"):
    jlora.register_adapter_kind("Bad", GatedConfig, GatedAdapter, build=build_gated, roles={"gate": "sideways"})


def test_a_kind_name_registered_twice_is_refused(gated_kind):
  with pytest.raises(ValueError, match="registered already"):
    jlora.register_adapter_kind("Gated", GatedConfig, GatedAdapter, build=build_gated, roles={})


def test_built_in_kinds_are_registered_through_the_same_call():
  kinds = jlora.nn.registered_kinds()
  assert {"LoRA", "DoRA", "MoSLoRA", "WLoRA"} <= set(kinds)
  assert kinds["DoRA"].adapter_type is jlora.nn.DoraAdapter
  assert jlora.nn.kind_for_config(jlora.LoraConfig(target_modules=["q"], use_dora=True)).name == "DoRA"
  assert jlora.nn.kind_for_config(jlora.MoSLoraConfig(target_modules=["q"])).name == "MoSLoRA"
