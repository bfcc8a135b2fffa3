"""Mixed-adapter batches (multi-LoRA serving): each row gathers its own adapter's factors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import testing
from test_fused_lora import TARGETS, tiny_llama

NAMES = [f"task{i}" for i in range(8)]


def eight_adapters():
  """A scanned Llama with 8 adapters of mixed kinds and ranks (LoRA, rank patterns, MoSLoRA)."""
  model = tiny_llama()
  for i, name in enumerate(NAMES):
    if i % 3 == 2:
      config = jlora.MoSLoraConfig(r=2, lora_alpha=4, target_modules=TARGETS)
    else:
      config = jlora.LoraConfig(r=1 + i % 4, lora_alpha=4, target_modules=TARGETS,
                                rank_pattern={"v_proj": 1} if i % 2 else {})
    jlora.add_adapter(model, name, config)
    testing.randomize_adapters(model, seed=i)
  return model


def alone(model, name, ids):
  if name == "__base__":
    with jlora.disable_adapters(model):
      return model(ids)
  jlora.set_adapter(model, name)
  return model(ids)


def test_each_row_equals_running_it_with_its_own_adapter():
  model = eight_adapters()
  names = NAMES[::-1] + ["__base__"]
  ids = testing.token_ids(len(names), 6, vocab=32)
  with jlora.per_sample_adapters(model, names):
    mixed = nnx.jit(lambda m, x: m(x))(model, ids)
  for row, name in enumerate(names):
    np.testing.assert_allclose(mixed[row], alone(model, name, ids)[row], rtol=2e-5, atol=2e-5)


def test_mixed_batch_runs_gathered_matmuls_not_one_pass_per_adapter():
  model = eight_adapters()
  ids = testing.token_ids(8, 6, vocab=32)
  with jlora.per_sample_adapters(model, NAMES):
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s, copy=True)(x))(state, ids))
  # A layer body has 7 base projections, 2 attention products and, gathered, one x·A and one h·B
  # per projection (14) whatever the number of adapters; a loop over 8 adapters would add 8·14.
  assert jaxpr.count("dot_general[") <= 2 * (7 + 2 + 14) + 1


def test_dropout_adapters_still_route_by_row():
  model = tiny_llama()
  for name in ("a", "b"):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.1))
    testing.randomize_adapters(model, seed=len(name))
  for _, layer in jlora.lora_layers(model):
    for adapter in layer.adapters.values():
      adapter.deterministic = True
  ids = testing.token_ids(2, 6, vocab=32)
  with jlora.per_sample_adapters(model, ["b", "a"]):
    mixed = model(ids)
  np.testing.assert_allclose(mixed[0], alone(model, "b", ids)[0], rtol=2e-5, atol=2e-5)
