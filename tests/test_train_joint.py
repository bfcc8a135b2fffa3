"""Joint training of several named adapters: one loss, one optimizer group per adapter."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora.train import ConfigError, NamedAdapter, TrainConfig, load_config
from jlora.train._steps import batch_nll, make_joint_optimizer, make_train_step, split_model
from train_doubles import CausalLM

STEPS = 3
GROUPS = {  # different learning rate, weight decay, clipping and LoRA+ ratio per adapter
    "knowledge": dict(learning_rate=3e-2, warmup_steps=1, end_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.999,
                      grad_clip=1.0, loraplus_lr_ratio=None, loraplus_lr_embedding=1e-6),
    "style": dict(learning_rate=1e-2, warmup_steps=0, end_lr_ratio=0.5, weight_decay=0.1, b1=0.8, b2=0.99,
                  grad_clip=0.05, loraplus_lr_ratio=4.0, loraplus_lr_embedding=1e-6),
}


def two_adapter_model():
  model = CausalLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                       adapter_name="knowledge")
  jlora.add_adapter(model, "style", jlora.MoSLoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                        init_lora_weights=False))
  jlora.set_adapter(model, ["knowledge", "style"])
  return model


def batch(seed):
  tokens = jax.random.randint(jax.random.key(seed), (2, 12), 3, 250)
  ones = jnp.ones_like(tokens)
  return {"tokens": tokens, "loss_mask": ones, "attention_mask": ones}


def hand_written_loop(model):
  """One ``jax.grad`` of the batch loss, then each adapter's own optax AdamW on its own leaves."""
  graphdef, params, rng, frozen = split_model(model)
  flat = leaves(params)
  owner = _adapter_of
  txs, states = {}, {}
  for name, o in GROUPS.items():
    mine = {p: v for p, v in flat.items() if owner(p) == name}
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if o["warmup_steps"] else o["learning_rate"], peak_value=o["learning_rate"],
        warmup_steps=o["warmup_steps"], decay_steps=STEPS, end_value=o["learning_rate"] * o["end_lr_ratio"])
    parts = [optax.clip_by_global_norm(o["grad_clip"]),
             optax.adamw(schedule, b1=o["b1"], b2=o["b2"], weight_decay=o["weight_decay"])]
    if o["loraplus_lr_ratio"]:
      parts.append(optax.masked(optax.scale(o["loraplus_lr_ratio"]),
                                {p: _leaf_name(p) == "lora_B" for p in mine}))
    txs[name] = optax.chain(*parts)
    states[name] = txs[name].init(mine)

  def loss_fn(p):
    total, count = batch_nll(nnx.merge(graphdef, p, rng, frozen, copy=True), b)
    return total / count

  losses, history = [], []
  for step in range(STEPS):
    b = batch(step)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    gflat = leaves(grads)
    flat = leaves(params)
    for name, tx in txs.items():
      mine = {p: v for p, v in flat.items() if owner(p) == name}
      updates, states[name] = tx.update({p: gflat[p] for p in mine}, states[name], mine)
      flat.update(optax.apply_updates(mine, updates))
    params = jax.tree_util.tree_unflatten(jax.tree.structure(params), [flat[p] for p in leaves(params)])
    losses.append(float(loss))
    history.append(flat)
  return losses, history


def leaves(tree) -> dict:
  """``{path string: leaf}`` (e.g. ``"...['adapters']['style']['lora_B'].value"``)."""
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _adapter_of(path: str) -> str:
  return re.search(r"\['adapters'\]\['([^']+)'\]", path).group(1)


def _leaf_name(path: str) -> str:
  return re.search(r"\['adapters'\]\['[^']+'\]\['([^']+)'\]", path).group(1)


def test_joint_step_equals_a_hand_written_loop_over_the_adapters():
  want_losses, want_history = hand_written_loop(two_adapter_model())

  model = two_adapter_model()
  graphdef, params, rng, frozen = split_model(model)
  tx = make_joint_optimizer(model, params, GROUPS, steps=STEPS, grad_accum=1)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, tx, loss_chunk_tokens=0)
  before = leaves(params)
  for k in range(STEPS):
    params, opt_state, rng, loss, _ = step(params, opt_state, rng, frozen, batch(k))
    np.testing.assert_allclose(float(loss), want_losses[k], rtol=1e-5)
    got = leaves(params)
    for path, want in want_history[k].items():
      np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want), rtol=1e-5, atol=1e-6,
                                 err_msg=path)
  for path, leaf in leaves(params).items():  # every adapter trains (the "knowledge" warmup starts at 0)
    assert not np.array_equal(np.asarray(leaf), np.asarray(before[path])), path


# ---- the job's adapters section -----------------------------------------------------------------


def write_yaml(tmp_path, text):
  path = tmp_path / "job.yaml"
  path.write_text(text)
  return path


def test_adapters_list_reads_each_kind_and_its_optimizer_overrides(tmp_path):
  cfg = load_config(write_yaml(tmp_path, """
optim: {learning_rate: 1.0e-3}
adapters:
  - {name: knowledge, kind: lora, r: 4}
  - {name: style, kind: moslora, r: 2, optim: {learning_rate: 5.0e-3, loraplus_lr_ratio: 16}}
"""))
  knowledge, style = cfg.adapters
  assert (knowledge.name, type(knowledge.config), knowledge.config.r) == ("knowledge", jlora.LoraConfig, 4)
  assert (style.name, type(style.config), style.config.r) == ("style", jlora.MoSLoraConfig, 2)
  assert knowledge.optim_section(cfg.optim).learning_rate == 1e-3  # inherits the job's optim
  assert style.optim_section(cfg.optim).learning_rate == 5e-3
  assert style.optim_section(cfg.optim).loraplus_lr_ratio == 16.0
  assert load_config(write_yaml(tmp_path, __import__("yaml").safe_dump(cfg.to_dict()))) == cfg  # round trip


def test_single_adapter_jobs_keep_their_config():
  assert "adapters" not in TrainConfig().to_dict()


@pytest.mark.parametrize("text, words", [
    ("adapters: [{name: a, r: 4}, {name: a, r: 2}]", "two adapters are named 'a'"),
    ("adapters: [{r: 4}]", "adapters[0].name"),
    ("adapters: [{name: 'a.b'}]", "adapters[0].name"),
    ("adapters: [{name: a, optim: {grad_accum: 2}}]", "optim.grad_accum for the whole job"),
    ("adapters: [{name: a, optim: {learning_rate: -1.0}}]", "adapters[0].optim.learning_rate must be > 0"),
    ("adapters: [{name: a, optim: {lr: 1.0}}]", "adapters[0].optim.lr"),
    ("adapters: [{name: a, kind: nope}]", "adapters[0].kind"),
    ("adapter: {r: 2}\nadapters: [{name: a}]", "leave adapter out"),
    ("save_merged: true\nadapters: [{name: a}]", "set save_merged=false"),
])
def test_bad_adapters_are_refused_up_front(tmp_path, text, words):
  with pytest.raises(ConfigError, match=re.escape(words)):
    load_config(write_yaml(tmp_path, text))


def test_adapters_given_in_code_are_checked_too():
  entry = NamedAdapter("a", jlora.LoraConfig(r=2))
  with pytest.raises(ConfigError, match="two adapters are named 'a'"):
    TrainConfig(adapters=(entry, entry))
