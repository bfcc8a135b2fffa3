"""LoRA+: B (and DoRA's magnitude) at ``loraplus_lr_ratio`` times A's learning rate, as PEFT's
``create_loraplus_optimizer`` groups them; PEFT + torch AdamW are the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft.optimizers import create_loraplus_optimizer

import jlora
import torch_oracle as oracle
from jlora.train import _steps
from jlora.train._config import ConfigError, load_config

MODULES = ("lin", "emb", "conv")
LR, RATIO, LR_EMBEDDING, STEPS = 1e-2, 16.0, 1e-3, 3


def train_jlora(model, tx, steps=STEPS):
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)
  state = tx.init(params)
  grad_fn = jax.jit(jax.grad(lambda p: oracle.jax_squared_loss(nnx.merge(graphdef, p, rest, copy=True), MODULES)))
  for _ in range(steps):
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
  nnx.update(model, params)


def twins():
  return oracle.twins({"default": dict(r=2, lora_alpha=4, target_modules=list(MODULES))})


def test_loraplus_training_matches_peft_create_loraplus_optimizer():
  root, model = twins()
  opt = create_loraplus_optimizer(root, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                  loraplus_lr_embedding=LR_EMBEDDING)
  for _ in range(STEPS):
    opt.zero_grad()
    oracle.torch_squared_loss(root, MODULES).backward()
    opt.step()
  tx = jlora.adapter_optimizer(model, optax.adamw(LR, weight_decay=0.0), loraplus_lr_ratio=RATIO,
                               learning_rate=LR, loraplus_lr_embedding=LR_EMBEDDING)
  train_jlora(model, tx)
  for _, layer in jlora.lora_layers(model):
    (name,) = layer.module_names
    a, b = oracle.flax_factors(root.get_submodule(name), "default")
    adapter = layer.adapters["default"]
    np.testing.assert_allclose(np.asarray(adapter.lora_A[...]), a, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(adapter.lora_B[...]), b, atol=1e-5, err_msg=name)


def first_update(model, **loraplus):
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)
  grads = jax.grad(lambda p: oracle.jax_squared_loss(nnx.merge(graphdef, p, rest, copy=True), MODULES))(params)
  tx = jlora.adapter_optimizer(model, optax.sgd(LR), **loraplus)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_b_update_is_ratio_times_the_plain_update_and_a_is_unchanged():
  _, model = twins()
  plain = first_update(model)
  plus = first_update(model, loraplus_lr_ratio=RATIO, learning_rate=LR)
  np.testing.assert_allclose(plus["lin"]["adapters"]["default"]["lora_B"][...],
                             RATIO * plain["lin"]["adapters"]["default"]["lora_B"][...], rtol=1e-6)
  np.testing.assert_array_equal(plus["lin"]["adapters"]["default"]["lora_A"][...],
                                plain["lin"]["adapters"]["default"]["lora_A"][...])


def test_embedding_adapters_train_at_loraplus_lr_embedding():
  _, model = twins()
  plain = first_update(model)
  plus = first_update(model, loraplus_lr_ratio=RATIO, learning_rate=LR, loraplus_lr_embedding=LR / 4)
  for factor in ("lora_A", "lora_B"):
    np.testing.assert_allclose(plus["emb"]["adapters"]["default"][factor][...],
                               plain["emb"]["adapters"]["default"][factor][...] / 4, rtol=1e-6)


def test_inactive_adapters_stay_frozen_under_loraplus():
  _, model = twins()
  jlora.add_adapter(model, "other", jlora.LoraConfig(r=2, target_modules=["lin"]))
  updates = first_update(model, loraplus_lr_ratio=RATIO, learning_rate=LR)
  assert not jnp.any(updates["lin"]["adapters"]["other"]["lora_B"][...])


def test_embedding_adapters_need_the_learning_rate():
  _, model = twins()
  with pytest.raises(ValueError, match="learning_rate="):
    jlora.adapter_optimizer(model, optax.sgd(LR), loraplus_lr_ratio=RATIO)


@pytest.mark.parametrize("ratio", [0, -1.0, True])
def test_nonpositive_ratio_is_rejected(ratio):
  _, model = twins()
  with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
    jlora.adapter_optimizer(model, optax.sgd(LR), loraplus_lr_ratio=ratio, learning_rate=LR)


def test_train_config_exposes_loraplus():
  cfg = load_config(None, ["optim.loraplus_lr_ratio=16"])
  assert cfg.optim.loraplus_lr_ratio == 16.0
  assert load_config().optim.loraplus_lr_ratio is None
  with pytest.raises(ConfigError, match="optim.loraplus_lr_ratio must be > 0"):
    load_config(None, ["optim.loraplus_lr_ratio=-2"])


def test_make_optimizer_applies_the_configured_ratio():
  _, model = twins()
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)
  grads = jax.tree.map(jnp.ones_like, params)
  kwargs = dict(learning_rate=LR, steps=10, warmup_steps=0, end_lr_ratio=1.0, weight_decay=0.0,
                b1=0.9, b2=0.999, grad_clip=0.0, grad_accum=1)
  updates = []
  for ratio in (None, RATIO):
    tx = _steps.make_optimizer(model, params, loraplus_lr_ratio=ratio, **kwargs)
    updates.append(tx.update(grads, tx.init(params), params)[0])
  plain, plus = (u["lin"]["adapters"]["default"]["lora_B"][...] for u in updates)
  np.testing.assert_allclose(plus, RATIO * plain, rtol=1e-6)


def test_dora_magnitudes_train_in_the_b_group_as_in_peft():
  root, model = oracle.twins({"default": dict(r=2, lora_alpha=4, target_modules=["lin"], use_dora=True)})
  opt = create_loraplus_optimizer(root, torch.optim.SGD, lr=LR, loraplus_lr_ratio=RATIO)
  magnitude = root.lin.lora_magnitude_vector["default"].weight
  model.lin.adapters["default"].lora_magnitude_vector[...] = oracle.to_np(magnitude)
  before = oracle.to_np(magnitude).copy()
  x = oracle.torch_inputs()[0]
  (root.lin(x) ** 2).mean().backward()
  opt.step()
  graphdef, params, rest = nnx.split(model, jlora.LoraParam, ...)
  grads = jax.grad(lambda p: (nnx.merge(graphdef, p, rest, copy=True).lin(oracle.to_np(x)) ** 2).mean())(params)
  tx = jlora.adapter_optimizer(model, optax.sgd(LR), loraplus_lr_ratio=RATIO)
  updates, _ = tx.update(grads, tx.init(params), params)
  got = updates["lin"]["adapters"]["default"]["lora_magnitude_vector"][...]
  np.testing.assert_allclose(np.asarray(got), oracle.to_np(magnitude) - before, atol=1e-6)
