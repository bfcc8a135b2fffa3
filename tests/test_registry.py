"""The layer registry: a user's own layer type gets LoRA through the same call the built-ins use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import jlora
from jlora import nn as jnn
from jlora import testing


class TorchStyleDense(nnx.Module):
  """A dense layer that stores its weight as ``[out, in]`` (torch's layout)."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.weight = nnx.Param(0.3 * jax.random.normal(rngs.params(), (dout, din)))
    self.bias = nnx.Param(jnp.full((dout,), 0.1))

  def __call__(self, x):
    return jnp.einsum("...i,oi->...o", x, self.weight[...]) + self.bias[...]


class LoraTorchStyleDense(jnn.LoraLayer):
  """A ``[in, r]``, B ``[r, out]``; the kernel-shaped update is ``(A·B)ᵀ``."""

  @classmethod
  def base_kernel(cls, base):
    return base.weight

  @classmethod
  def kernel_ndim(cls, base):
    return 2

  def factor_shapes(self, rank):
    out_features, in_features = self.base_layer.weight.shape[-2:]
    return (in_features, rank), (rank, out_features)

  def project_in(self, x, a):
    return x @ a

  def project_out(self, h, b):
    return h @ b

  def factors_to_weight(self, a, b):
    return (a @ b).T


class Net(nnx.Module):
  def __init__(self, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.encoder = TorchStyleDense(4, 6, rngs=rngs)
    self.decoder = TorchStyleDense(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.decoder(jnp.tanh(self.encoder(x)))


X = jax.random.normal(jax.random.key(5), (2, 4))
CONFIG = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["encoder", "decoder"])


def adapted_net(randomize: bool = True, adapter_seed: int = 0):
  """``Net`` (same base weights every time) with LoRA on both layers."""
  jlora.register_lora_layer(TorchStyleDense)(LoraTorchStyleDense)
  model = jlora.get_peft_model(Net(), CONFIG)
  if randomize:
    testing.randomize_adapters(model, seed=adapter_seed)
  return model


def test_unregistered_layer_types_cannot_be_targeted():
  with pytest.raises(ValueError, match="Net has no layers that can take LoRA"):
    jlora.get_peft_model(Net(), CONFIG)


def test_registered_layer_gets_an_adapter():
  model = adapted_net(randomize=False)
  assert isinstance(model.encoder, LoraTorchStyleDense)
  assert model.encoder.adapters["default"].lora_A.shape == (4, 2)


def test_custom_layer_forward_adds_the_lora_delta():
  model = adapted_net()
  adapter = model.encoder.adapters["default"]
  expected = model.encoder.base_layer(X) + X @ adapter.lora_A[...] @ adapter.lora_B[...] * 2.0
  np.testing.assert_allclose(model.encoder(X), expected, rtol=1e-5, atol=1e-6)


def test_custom_layer_merge_matches_forward_and_unmerge_restores():
  model = adapted_net()
  before, weight = model(X), np.asarray(model.encoder.base_layer.weight[...])
  jlora.merge_adapter(model)
  np.testing.assert_allclose(model(X), before, rtol=1e-5, atol=1e-5)
  jlora.unmerge_adapter(model)
  np.testing.assert_allclose(model.encoder.base_layer.weight[...], weight, atol=1e-6)


def test_custom_layer_merge_and_unload():
  model = adapted_net()
  before = model(X)
  jlora.merge_and_unload(model)
  assert type(model.encoder) is TorchStyleDense
  np.testing.assert_allclose(model(X), before, rtol=1e-5, atol=1e-5)


def test_custom_layer_adapter_state_round_trips_through_safetensors(tmp_path):
  trained = adapted_net(adapter_seed=1)
  flat = {"/".join(map(str, path)): np.asarray(v[...]) for path, v in
          nnx.to_flat_state(jlora.adapter_state(trained))}
  save_file(flat, tmp_path / "adapter.safetensors")

  fresh = adapted_net(randomize=False)
  assert not np.allclose(fresh(X), trained(X))
  loaded = load_file(tmp_path / "adapter.safetensors")
  state = nnx.from_flat_state([(tuple(k.split("/")), v) for k, v in loaded.items()])
  jlora.load_adapter_state(fresh, state)
  np.testing.assert_array_equal(fresh(X), trained(X))


def test_adapter_state_round_trips_through_nnx_state():
  trained, fresh = adapted_net(adapter_seed=1), adapted_net(randomize=False)
  jlora.load_adapter_state(fresh, jlora.adapter_state(trained))
  np.testing.assert_array_equal(fresh(X), trained(X))


def test_builtins_are_in_the_public_registry():
  registered = jnn.registered_types()
  assert registered[nnx.Linear] is jnn.LoraLinear
  assert registered[nnx.Embed] is jnn.LoraEmbed
  assert registered[nnx.Conv] is jnn.LoraConv
  assert registered[nnx.LinearGeneral] is jnn.LoraLinearGeneral
  assert registered[nnx.Einsum] is jnn.LoraEinsum


def test_registered_types_is_a_copy():
  jnn.registered_types().clear()
  assert nnx.Linear in jnn.registered_types()


def test_subclasses_use_their_parents_entry():
  class MyLinear(nnx.Linear):
    pass

  assert jnn.lora_layer_type(MyLinear(2, 3, rngs=nnx.Rngs(0))) is jnn.LoraLinear


def test_registering_a_type_twice_needs_override():
  jlora.register_lora_layer(TorchStyleDense, LoraTorchStyleDense)

  class Other(LoraTorchStyleDense):
    pass

  with pytest.raises(ValueError, match="override=True"):
    jlora.register_lora_layer(TorchStyleDense, Other)
  jlora.register_lora_layer(TorchStyleDense, Other, override=True)
  assert jnn.registered_types()[TorchStyleDense] is Other


def test_unregister_removes_the_entry():
  jlora.register_lora_layer(TorchStyleDense, LoraTorchStyleDense)
  jnn.unregister_lora_layer(TorchStyleDense)
  assert TorchStyleDense not in jnn.registered_types()


def test_only_lora_layer_subclasses_can_be_registered():
  with pytest.raises(TypeError, match="subclass of jlora.nn.LoraLayer"):
    jlora.register_lora_layer(TorchStyleDense, object)


def test_only_nnx_modules_can_be_wrapped():
  with pytest.raises(TypeError, match="nnx.Module subclass"):
    jlora.register_lora_layer(int, LoraTorchStyleDense)


def test_builtin_lookup_goes_through_the_same_registry():
  jnn.unregister_lora_layer(nnx.Linear)
  model = jlora.get_peft_model(testing.TinyLM(), jlora.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
  assert [layer.module_names for _, layer in jlora.lora_layers(model)] == [("model.embed_tokens",)]


def test_svd_combination_works_for_a_layer_whose_kernel_is_out_by_in():
  jlora.register_lora_layer(TorchStyleDense, LoraTorchStyleDense)
  model = Net()
  jlora.add_adapter(model, "a", CONFIG)
  jlora.add_adapter(model, "b", CONFIG)
  testing.randomize_adapters(model)
  expected = {p: 0.5 * l.delta_weight("a") + 2.0 * l.delta_weight("b") for p, l in jlora.lora_layers(model)}
  jlora.add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "ab", combination_type="svd", svd_rank=4)
  for path, layer in jlora.lora_layers(model):
    np.testing.assert_allclose(layer.delta_weight("ab"), expected[path], rtol=1e-4, atol=1e-5)
