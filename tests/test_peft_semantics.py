"""PEFT's adapter-management semantics, real ``peft`` as the oracle: which adapter is active after a
delete, all-or-nothing deletes, one ``modules_to_save`` copy active at a time."""

from __future__ import annotations

import copy
import json
import warnings

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jlora
from jlora import testing
from tests import hf_doubles, torch_oracle

ADAPTERS = {name: dict(r=2, target_modules=["lin"], modules_to_save=["emb"] if name != "m" else None)
            for name in ("x", "m", "c")}


def peft_active(root) -> tuple[str, ...]:
  active = root.active_adapter
  return (active,) if isinstance(active, str) else tuple(active)


@pytest.mark.parametrize("active, deleted", [(["x"], "x"), (["x", "m"], "x"), (["c", "m"], "m")],
                         ids=["only-active", "one-of-two", "other-remains"])
def test_deleting_an_active_adapter_activates_what_peft_does(active, deleted):
  root, model = torch_oracle.twins({n: {k: v for k, v in kw.items() if v is not None}
                                    for n, kw in ADAPTERS.items()}, active=active[:1])
  if len(active) > 1:  # two active adapters: PEFT's LoRA layers take several (no copy clash here)
    root.set_adapter(active)
    jlora.set_adapter(model, active)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    root.delete_adapter(deleted)
  jlora.delete_adapter(model, deleted)
  assert jlora.active_adapters(model) == tuple(sorted(peft_active(root), key=list(ADAPTERS).index))
  wrapper = model.emb
  assert wrapper.active_adapters == tuple(root.model.emb.active_adapters)


def test_deleting_the_only_active_adapter_activates_the_first_remaining_by_name():
  model = testing.TinyLM()
  for name in ("x", "m", "c"):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  jlora.set_adapter(model, "x")
  jlora.delete_adapter(model, "x")
  assert jlora.active_adapters(model) == ("c",)


def test_a_refused_delete_leaves_the_model_untouched():
  model = testing.TinyLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["lm_head"]))
  testing.randomize_adapters(model)
  _, last = list(jlora.lora_layers(model))[-1]
  last.merge(["default"])  # merged in one layer only: every other holder comes first
  before = model(testing.token_ids())
  with pytest.raises(ValueError, match="'default' is merged; unmerge it before deleting it"):
    jlora.delete_adapter(model, "default")
  assert isinstance(model.lm_head, jlora.nn.ModulesToSaveWrapper)
  assert "default" in model.lm_head.adapters and "default" in jlora.peft_config(model)
  assert all("default" in layer.adapters for _, layer in jlora.lora_layers(model))
  np.testing.assert_array_equal(model(testing.token_ids()), before)


def test_two_adapters_copying_one_module_cannot_both_be_active_as_in_peft():
  kwargs = dict(r=2, target_modules=["lin"], modules_to_save=["emb"])
  root, model = torch_oracle.twins({"p": kwargs, "q": kwargs})
  with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
    root.set_adapter(["p", "q"])
  with pytest.raises(ValueError, match="Only one adapter can be set at a time .* emb.*Activate only one"):
    jlora.set_adapter(model, ["p", "q"])
  assert jlora.active_adapters(model) == ("p",)


def test_saved_adapter_loads_with_auto_peft_model(llama, tmp_path):
  path, _ = llama
  model = jlora.from_pretrained(path, dtype=jnp.float32)
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
  testing.randomize_adapters(model)
  jlora.save_peft(model, tmp_path / "a")
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert (config["task_type"], config["base_model_name_or_path"]) == ("CAUSAL_LM", str(path))
  loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(hf_doubles.logits(loaded, ids), np.asarray(model(ids)), atol=1e-4)


def test_save_peft_writes_the_base_name_it_is_given(tmp_path):
  model = testing.TinyLM()
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, target_modules=["q_proj"]))
  jlora.save_peft(model, tmp_path / "a", base_model_name_or_path="org/base")
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == "org/base"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  """``(dir, transformers model)``: a tiny Llama with tied embeddings."""
  path = tmp_path_factory.mktemp("tied")
  return path, hf_doubles.save("llama_tied", path)


def test_a_peft_head_copy_of_a_tied_model_loads_as_peft_computes(tied, tmp_path):
  path, base = tied
  made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
      r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
  with torch.no_grad():
    made.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.3)
  made.save_pretrained(tmp_path / "a")
  model = jlora.load_peft(hf_doubles.jlora_model(path), tmp_path / "a")
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(np.asarray(model(ids)), hf_doubles.logits(made.eval(), ids), atol=1e-4)


def test_merging_lora_on_a_tied_embedding_unties_the_head(tied, tmp_path):
  path, base = tied
  made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
      r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
  made.save_pretrained(tmp_path / "a")
  ids, _ = hf_doubles.batch()
  adapted = hf_doubles.logits(made.eval(), ids)
  model = jlora.load_peft(hf_doubles.jlora_model(path), tmp_path / "a")
  np.testing.assert_allclose(np.asarray(model(ids)), adapted, atol=1e-4)
  merged = jlora.merge_and_unload(model)
  np.testing.assert_allclose(np.asarray(merged(ids)), adapted, atol=1e-4)
  jlora.save_pretrained(merged, tmp_path / "merged")
  assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  np.testing.assert_allclose(hf_doubles.logits(reloaded, ids), adapted, atol=1e-4)


def test_safe_merge_refuses_a_broken_adapter_as_peft_and_merges_nothing():
  root, model = torch_oracle.twins({"default": dict(r=2, target_modules=["lin", "emb"])})
  with torch.no_grad():
    root.model.lin.lora_B["default"].weight[0, 0] = float("nan")
  model.lin.adapters["default"].lora_B[...] = model.lin.adapters["default"].lora_B[...].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
    root.merge_adapter(safe_merge=True)
  emb_before = np.asarray(model.emb.base_layer.embedding[...]).copy()
  with pytest.raises(ValueError, match="NaNs detected in the merged weights of lin: the adapter 'default'"):
    jlora.merge_and_unload(model, safe_merge=True)
  assert not model.emb.merged_adapters and isinstance(model.lin, jlora.LoraLayer)
  np.testing.assert_array_equal(np.asarray(model.emb.base_layer.embedding[...]), emb_before)


def test_safe_merge_of_a_finite_adapter_merges_as_peft():
  root, model = torch_oracle.twins({"default": dict(r=2, target_modules=["lin"])})
  root.merge_adapter(safe_merge=True)
  jlora.merge_adapter(model, safe_merge=True)
  np.testing.assert_allclose(np.asarray(model.lin.base_layer.kernel[...]),
                             torch_oracle.to_np(root.model.lin.base_layer.weight).T, atol=1e-6)


def _lin_out(root, model):
  expected, got = torch_oracle.outputs(root, model, "lin")
  np.testing.assert_allclose(got, expected, atol=1e-5)
  return got


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_set_scale_scale_layer_and_unscale_layer_as_peft(rslora):
  root, model = torch_oracle.twins({"p": dict(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["lin"]),
                                    "q": dict(r=2, lora_alpha=2, target_modules=["lin"])}, active=["p", "q"])
  steps = [(lambda l: l.set_scale("p", 0.5), lambda m: jlora.set_scale(m, "p", 0.5)),
           (lambda l: l.scale_layer(3.0), lambda m: jlora.scale_layer(m, 3.0)),
           (lambda l: l.unscale_layer(2.0), lambda m: jlora.unscale_layer(m, 2.0)),
           (lambda l: l.unscale_layer(None), lambda m: jlora.unscale_layer(m))]
  outs = []
  for on_peft, on_jlora in steps:
    on_peft(root.model.lin)
    on_jlora(model)
    outs.append(_lin_out(root, model))
  assert not np.allclose(outs[0], outs[1])


def test_disabled_adapter_layers_stay_disabled_until_enabled_as_peft():
  root, model = torch_oracle.twins({"default": dict(r=2, target_modules=["lin"])})
  adapted = _lin_out(root, model)
  jlora.merge_adapter(model)
  root.disable_adapter_layers()
  jlora.disable_adapter_layers(model)
  base = _lin_out(root, model)
  assert not np.allclose(base, adapted)
  jlora.set_adapter(model, "default")  # activating leaves the layers disabled, as in PEFT
  root.set_adapter("default")
  _lin_out(root, model)
  root.enable_adapter_layers()
  jlora.enable_adapter_layers(model)
  np.testing.assert_allclose(_lin_out(root, model), adapted, atol=1e-5)
