"""The family registry: a family registered from the test suite loads, scans, trains and saves like a built-in one.

The toy family (``family_doubles``) alternates global layers with layers
that attend within a local window, so these tests also pin per-layer
attention settings through the scanned stack.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import family_doubles
import jlora
import train_doubles
from family_doubles import TOY, ToyConfig, ToyLM
from jlora import models

WINDOW, LENGTH = 3, 10


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("toy")
  family_doubles.save_checkpoint(path, local_window=WINDOW)
  return path


def ids(batch: int = 2, length: int = LENGTH, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.RandomState(seed).randint(0, family_doubles.VOCAB, (batch, length)), jnp.int32)


def with_config(model: ToyLM, **changes) -> nnx.Module:
  """A model of ``model``'s weights under a changed config (``cls`` picks the class)."""
  cls = changes.pop("cls", ToyLM)
  config = dataclasses.replace(model.config, **changes) if cls is ToyLM else models.LlamaConfig(
      **{f.name: getattr(model.config, f.name) for f in dataclasses.fields(models.LlamaConfig)} | changes)
  other = cls(config, dtype=jnp.float32)
  nnx.update(other, nnx.state(model))
  return other


def test_a_registered_family_loads_from_an_hf_directory(toy_dir):
  model = jlora.from_pretrained(toy_dir, dtype=jnp.float32)
  assert type(model) is ToyLM and isinstance(model.config, ToyConfig) and model.config.local_window == WINDOW
  assert models.family_of(model) is TOY and family_doubles.MODEL_TYPE in models.supported_model_types()


def test_with_a_window_wider_than_the_rows_the_toy_is_the_llama_it_was_saved_as(tmp_path):
  hf = family_doubles.save_checkpoint(tmp_path, local_window=LENGTH)
  model = jlora.from_pretrained(tmp_path, dtype=jnp.float32)
  import torch

  with torch.no_grad():
    want = hf(torch.as_tensor(np.array(ids()), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(model(ids()), want, atol=1e-4, rtol=0)


def test_odd_layer_windows_change_only_what_the_window_hides(toy_dir):
  model = jlora.from_pretrained(toy_dir, dtype=jnp.float32)
  alternating = np.asarray(model(ids()))
  global_ = np.asarray(with_config(model, local_window=None)(ids()))
  every_layer_local = np.asarray(with_config(model, cls=models.CausalLM, sliding_window=WINDOW)(ids()))
  np.testing.assert_allclose(alternating[:, :WINDOW], global_[:, :WINDOW], atol=1e-5, rtol=0)
  assert not np.allclose(alternating[:, WINDOW:], global_[:, WINDOW:], atol=1e-3)
  assert not np.allclose(alternating[:, WINDOW:], every_layer_local[:, WINDOW:], atol=1e-3)


def test_per_layer_windows_still_trace_one_layer_body():
  sizes = []
  for layers in (2, 4):
    config = ToyConfig(**family_doubles.SIZES | dict(num_hidden_layers=layers), model_type=family_doubles.MODEL_TYPE,
                       head_dim=4, local_window=WINDOW)
    model = ToyLM(config, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    sizes.append(len(str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids()))(state)).splitlines()))
  assert sizes[0] == sizes[1]


def test_cached_and_padded_calls_see_the_same_per_layer_windows(toy_dir):
  model = jlora.from_pretrained(toy_dir, dtype=jnp.float32)
  x = ids()
  want = np.asarray(model(x))
  np.testing.assert_allclose(model(x, attention_mask=jnp.ones_like(x)), want, atol=1e-5, rtol=0)
  cache = models.KVCache.zeros(model.config, x.shape[0], LENGTH, jnp.float32)
  logits, _ = model(x, cache=cache)
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)


def test_packed_rows_keep_per_layer_windows_within_each_record(toy_dir):
  model = jlora.from_pretrained(toy_dir, dtype=jnp.float32)
  a, b = ids(1, 6, seed=2), ids(1, 4, seed=3)
  packed = model(jnp.concatenate([a, b], axis=1), segment_ids=jnp.asarray([[0] * 6 + [1] * 4]))
  np.testing.assert_allclose(packed[:, :6], model(a), atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[:, 6:], model(b), atol=1e-5, rtol=0)


def test_the_toy_trains_and_saves_through_the_calls_a_built_in_family_uses(toy_dir, tmp_path):
  model = jlora.get_peft_model(jlora.from_pretrained(toy_dir, dtype=jnp.float32),
                               jlora.LoraConfig(r=2, target_modules="all-linear"))
  tokens = ids()
  params, losses = train_doubles.lora_train_steps(model, tokens)
  assert losses[-1] < losses[0]
  nnx.update(model, params)
  model.eval()
  adapted = np.asarray(model(tokens))

  jlora.save_peft(model, tmp_path / "adapter")
  reloaded = jlora.load_peft(jlora.from_pretrained(toy_dir, dtype=jnp.float32), tmp_path / "adapter")
  np.testing.assert_allclose(reloaded(tokens), adapted, atol=1e-5, rtol=0)

  jlora.save_pretrained(jlora.merge_and_unload(model), tmp_path / "merged")
  assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == family_doubles.MODEL_TYPE
  merged = jlora.from_pretrained(tmp_path / "merged", dtype=jnp.float32)
  assert type(merged) is ToyLM
  np.testing.assert_allclose(merged(tokens), adapted, atol=1e-4, rtol=0)


def test_a_model_type_of_another_family_is_refused():
  with pytest.raises(ValueError, match="already belong to another family"):
    models.register_family(dataclasses.replace(TOY, name="impostor", model_types=("llama",)))


def test_a_model_class_outside_the_protocol_is_refused():
  with pytest.raises(ValueError, match="subclass of jlora.models.LanguageModel"):
    models.Family(name="bad", model_types=("bad",), from_hf=lambda hf: None, model_class=nnx.Module)
