"""``jlora.generate``: KV-cached greedy decoding equals transformers'; sampling is seeded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jlora
from jlora import testing
from jlora.models import sample_token
from tests import hf_doubles

NEW = 6


def load(family, tmp_path):
  ref = hf_doubles.save(family, tmp_path)
  return ref, jlora.from_pretrained(tmp_path, dtype=jnp.float32)


def hf_greedy(ref, ids, mask=None):
  mask = np.ones_like(ids) if mask is None else mask  # else HF masks every id equal to pad_token_id
  ref.generation_config.eos_token_id = None  # no early stop, no eos suppression: plain argmax
  with torch.no_grad():
    out = ref.generate(torch.as_tensor(ids, dtype=torch.long), do_sample=False, max_new_tokens=NEW,
                       pad_token_id=0,
                       attention_mask=torch.as_tensor(mask))
  return out.numpy()


@pytest.mark.parametrize("family", ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "gpt2"])
def test_greedy_equals_transformers(family, tmp_path):
  ref, model = load(family, tmp_path)
  ids, _ = hf_doubles.batch()
  np.testing.assert_array_equal(jlora.generate(model, ids, NEW), hf_greedy(ref, ids))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_greedy_equals_transformers(family, tmp_path):
  ref, model = load(family, tmp_path)
  ids, mask = hf_doubles.batch()
  ids = np.where(mask == 1, ids, 0)
  ours = jlora.generate(model, ids, NEW, attention_mask=mask)
  np.testing.assert_array_equal(ours, hf_greedy(ref, ids, mask))


def test_cached_decoding_equals_full_forward(tmp_path):
  _, model = load("qwen3", tmp_path)
  ids, _ = hf_doubles.batch()
  out = np.asarray(jlora.generate(model, ids, NEW))
  logits = np.asarray(model(jnp.asarray(out)))
  np.testing.assert_array_equal(out[:, ids.shape[1]:], logits[:, ids.shape[1] - 1:-1].argmax(-1))


def test_sampling_is_deterministic_given_the_seed(tmp_path):
  _, model = load("llama", tmp_path)
  ids, _ = hf_doubles.batch()
  a = jlora.generate(model, ids, NEW, temperature=1.0, top_p=0.9, seed=3)
  b = jlora.generate(model, ids, NEW, temperature=1.0, top_p=0.9, seed=3)
  c = jlora.generate(model, ids, NEW, temperature=1.0, top_p=0.9, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(sample_token(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
  assert draws == {0, 1}


def test_tiny_top_p_is_greedy(tmp_path):
  _, model = load("gpt2", tmp_path)
  ids, _ = hf_doubles.batch()
  np.testing.assert_array_equal(jlora.generate(model, ids, NEW, temperature=0.7, top_p=1e-6, seed=1),
                                jlora.generate(model, ids, NEW))


def test_rows_after_eos_stay_eos(tmp_path):
  _, model = load("llama", tmp_path)
  ids, _ = hf_doubles.batch()
  greedy = np.asarray(jlora.generate(model, ids, NEW))
  eos = int(greedy[0, ids.shape[1] + 1])
  out = np.asarray(jlora.generate(model, ids, NEW, eos_token_id=eos))
  first = ids.shape[1] + int(np.argmax(greedy[0, ids.shape[1]:] == eos))
  assert (out[0, first:] == eos).all()
  np.testing.assert_array_equal(out[0, :first], greedy[0, :first])


def test_generation_with_lora_equals_the_merged_model(tmp_path):
  _, model = load("llama", tmp_path)
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules="all-linear"))
  testing.randomize_adapters(model, scale=0.5)
  ids, _ = hf_doubles.batch()
  adapted = jlora.generate(model, ids, NEW)
  np.testing.assert_array_equal(adapted, jlora.generate(jlora.merge_and_unload(model), ids, NEW))


def test_bad_arguments_name_the_problem(tmp_path):
  _, model = load("gpt2", tmp_path)
  with pytest.raises(ValueError, match="max_new_tokens"):
    jlora.generate(model, np.zeros((1, 3), np.int32), 0)
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    jlora.generate(model, np.zeros((3,), np.int32), 2)
  with pytest.raises(ValueError, match="attention_mask"):
    jlora.generate(model, np.zeros((1, 3), np.int32), 2, attention_mask=np.ones((1, 4)))


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_not_finite_and_non_negative_is_refused(tmp_path, temperature):
  _, model = load("gpt2", tmp_path)
  with pytest.raises(ValueError, match=rf"temperature must be a finite number >= 0.*got {temperature}"):
    jlora.generate(model, np.zeros((1, 3), np.int32), 2, temperature=temperature)


def test_generation_ignores_lora_dropout(tmp_path):
  _, model = load("llama", tmp_path)
  model = jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5))
  testing.randomize_adapters(model, scale=0.5)
  ids, _ = hf_doubles.batch()
  out = np.asarray(jlora.generate(model, ids, NEW))
  model.eval()
  greedy = np.asarray(model(jnp.asarray(out)))[:, ids.shape[1] - 1:-1].argmax(-1)
  np.testing.assert_array_equal(out[:, ids.shape[1]:], greedy)


def test_decoding_without_the_cache_gives_the_cached_tokens():
  from attention_doubles import tiny_llama

  model = tiny_llama()
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (1, 5)), jnp.int32)
  cached = jlora.generate(model, ids, 6)
  np.testing.assert_array_equal(jlora.generate(model, ids, 6, use_cache=False), cached)


def test_a_model_of_your_own_decodes_by_rerunning_its_forward_pass():
  from train_doubles import CausalLM

  model = CausalLM()
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 258, (1, 4)), jnp.int32)
  want = ids
  for _ in range(3):
    want = jnp.concatenate([want, jnp.argmax(model(want)[:, -1:], axis=-1).astype(jnp.int32)], axis=1)
  np.testing.assert_array_equal(jlora.generate(model, ids, 3), want)
