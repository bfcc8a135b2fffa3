"""``jlora inspect``'s verdicts come from the checks ``load_peft`` runs, and every adapter it calls
loadable by stock PEFT loads in real ``peft`` (the oracle), with all its tensors."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import jlora
from jlora._cli._inspect import summarize
from tests import hf_doubles

PEFT_ADAPTERS = {
    "dora": dict(r=2, target_modules=["q_proj", "v_proj"], use_dora=True),
    "modules_to_save": dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "embed_tokens": dict(r=2, target_modules=["embed_tokens", "q_proj"]),
}


def peft_adapter(base, out, **kwargs):
  model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
  model.save_pretrained(out)
  return model.eval()


@pytest.mark.parametrize("name", sorted(PEFT_ADAPTERS))
def test_what_inspect_calls_loadable_loads_in_peft_and_jlora(llama, tmp_path, name):
  path, base = llama
  made = peft_adapter(base, tmp_path / name, **PEFT_ADAPTERS[name])
  info = summarize(tmp_path / name)
  assert info["stock_peft_loads"] and info["jlora_loads"], info
  assert info["type"] == ("DoRA" if name == "dora" else "LoRA")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # PEFT warns about missing or unexpected keys
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
  ids, _ = hf_doubles.batch()
  np.testing.assert_allclose(hf_doubles.logits(loaded, ids), hf_doubles.logits(made, ids), atol=1e-5)
  model = jlora.load_peft(hf_doubles.jlora_model(path), tmp_path / name)
  np.testing.assert_allclose(np.asarray(model(ids)), hf_doubles.logits(made, ids), atol=1e-4)


def _rewrite_config(directory, **fields):
  config = json.loads((directory / "adapter_config.json").read_text())
  config.update(fields)
  (directory / "adapter_config.json").write_text(json.dumps(config))


def test_a_config_rank_above_the_tensors_rank_loads_nowhere(llama, tmp_path):
  path, base = llama
  peft_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj"])
  _rewrite_config(tmp_path / "a", r=8, lora_alpha=16)
  info = summarize(tmp_path / "a")
  assert not info["jlora_loads"] and info["stock_peft_loads"] is False
  assert "(4, 16)" in info["jlora_problem"] and "rank 8" in info["jlora_problem"]
  with pytest.raises(ValueError, match=r"shape \(4, 16\).*rank 8, i.e. \(8, 16\): the config does not match the weights"):
    jlora.load_peft(hf_doubles.jlora_model(path), tmp_path / "a")
  with pytest.raises(RuntimeError, match="size mismatch"):
    peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")


def test_lora_tensors_under_another_peft_type_load_nowhere(llama, tmp_path):
  _, base = llama
  peft_adapter(base, tmp_path / "a", r=2, target_modules=["q_proj"])
  _rewrite_config(tmp_path / "a", peft_type="IA3")
  info = summarize(tmp_path / "a")
  assert info["type"] == "IA3" and not info["jlora_loads"] and info["stock_peft_loads"] is False
  assert "LoRA factors" in info["stock_peft_problems"][0]


def test_tensors_the_kind_does_not_have_are_refused_by_load_peft_and_inspect(llama, tmp_path):
  path, base = llama
  peft_adapter(base, tmp_path / "a", r=2, target_modules=["q_proj"])
  tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
  tensors["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"] = torch.ones(16)
  save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
  info = summarize(tmp_path / "a")
  assert not info["jlora_loads"] and info["stock_peft_loads"] is False
  assert "ia3_l" in info["jlora_problem"]
  with pytest.raises(ValueError, match="a LoRA adapter .* does not have, e.g. .*ia3_l"):
    jlora.load_peft(hf_doubles.jlora_model(path), tmp_path / "a")
