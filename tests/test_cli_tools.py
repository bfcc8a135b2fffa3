"""``jlora merge`` / ``generate`` / ``inspect`` / ``convert``: each does its job, and bad input is one clear error."""

import json
import sys

import numpy as np
import pytest

import jlora
from jlora._cli._common import load_base
from jlora.cli import main
from jlora.io._safetensors import read as read_safetensors
from jlora.testing import randomize_adapters
from jlora.train import ByteTokenizer
from jlora.train._report import continue_prompts

torch = pytest.importorskip("torch")
import hf_doubles  # noqa: E402  (needs torch)


def _adapter(model, directory, config=None, seed=0):
  jlora.get_peft_model(model, config or jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
  randomize_adapters(model, seed=seed, scale=0.3)
  jlora.save_peft(model, directory)
  return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """``(base_dir, adapter_dir)``: a tiny transformers Llama and a random LoRA adapter for it."""
  root = tmp_path_factory.mktemp("llama")
  hf_doubles.save("llama", root / "base")
  _adapter(jlora.from_pretrained(root / "base", dtype=np.float32), root / "adapter")
  return root / "base", root / "adapter"


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
  """A random LoRA adapter for the ``tiny`` preset (byte vocabulary)."""
  directory = tmp_path_factory.mktemp("tiny") / "adapter"
  _adapter(load_base("tiny")[0], directory, seed=4)
  return directory


# ---------------------------------------------------------------------------- merge


def test_merged_checkpoint_loads_in_transformers_as_base_plus_adapter(llama, tmp_path):
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  base_dir, adapter_dir = llama
  assert main(["merge", str(base_dir), str(adapter_dir), str(tmp_path / "merged")]) == 0
  merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
  ids, mask = hf_doubles.batch()
  np.testing.assert_allclose(hf_doubles.logits(merged, ids, mask), hf_doubles.logits(adapted, ids, mask),
                             atol=1e-4)


def test_merge_keeps_the_bases_dtype_unless_asked(llama, tmp_path):
  base_dir, adapter_dir = llama
  assert main(["merge", str(base_dir), str(adapter_dir), str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
  assert {str(v.dtype) for v in read_safetensors(tmp_path / "m" / "model.safetensors").values()} == {"bfloat16"}


def test_merge_refuses_a_non_empty_out_dir_and_leaves_it_alone(llama, tmp_path, capsys):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "mine.txt").write_text("keep")
  assert main(["merge", *map(str, llama), str(tmp_path / "out")]) == 1
  assert "not empty" in capsys.readouterr().err
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_merge_with_an_unknown_base_names_the_presets(llama, tmp_path, capsys):
  assert main(["merge", str(tmp_path / "nope"), str(llama[1]), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "byte-stories" in err and "checkpoint directory" in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- generate


def test_generate_applies_every_adapter_given(tiny_adapter, capsys):
  model = load_base("tiny")[0]
  jlora.load_peft(model, tiny_adapter)
  model.eval()
  (want,) = continue_prompts(model, ByteTokenizer(), ["Mia had"], 6)
  assert main(["generate", "tiny", "--adapter", str(tiny_adapter), "--prompt", "Mia had",
               "--max-new-tokens", "6"]) == 0
  assert capsys.readouterr().out == "Mia had" + want + "\n"


def test_generate_needs_a_tokenizer_for_a_checkpoint_without_one(llama, capsys):
  assert main(["generate", str(llama[0]), "--prompt", "hi"]) == 1
  assert "--tokenizer" in capsys.readouterr().err


def test_generate_refuses_a_tokenizer_larger_than_the_vocabulary(llama, capsys):
  assert main(["generate", str(llama[0]), "--tokenizer", "bytes", "--prompt", "hi"]) == 1
  assert "258" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_generate_refuses_a_temperature_that_is_not_finite_and_non_negative(temperature, capsys):
  assert main(["generate", "tiny", "--prompt", "hi", "--temperature", temperature]) == 1
  assert "--temperature must be a finite number >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------- inspect


def test_inspect_reports_type_targets_ranks_and_size(llama, capsys):
  assert main(["inspect", str(llama[1]), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  # 2 layers x (q_proj A [2,16] + B [16,2], v_proj A [2,16] + B [8,2])
  assert info["type"] == "LoRA" and info["modules_by_name"] == {"q_proj": 2, "v_proj": 2}
  assert info["ranks"] == {"2": 4} and info["parameters"] == 2 * (64 + 48)
  assert info["stock_peft_loads"] and info["jlora_loads"]


def _fork_adapter(directory, fmt="safetensors"):
  """An adapter as the MoSLoRA authors' PEFT fork writes it: lora_use_mixer and lora_AB mixers."""
  gen = torch.Generator().manual_seed(0)
  tensors = {"base_model.model.lin.lora_A.weight": torch.randn(2, 6, generator=gen),
             "base_model.model.lin.lora_AB.weight": torch.randn(2, 2, generator=gen),
             "base_model.model.lin.lora_B.weight": torch.randn(5, 2, generator=gen).to(torch.bfloat16)}
  directory.mkdir()
  if fmt == "bin":
    torch.save(tensors, directory / "adapter_model.bin")
  else:
    from safetensors.torch import save_file

    save_file(tensors, directory / "adapter_model.safetensors")
  (directory / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin"], "lora_use_mixer": True}))
  return tensors


def test_inspect_says_stock_peft_cannot_load_moslora_mixers(tmp_path, capsys):
  _fork_adapter(tmp_path / "mos")
  assert main(["inspect", str(tmp_path / "mos")]) == 0
  out = capsys.readouterr().out
  assert "MoSLoRA" in out and "stock PEFT:  cannot load it" in out and "lora_AB" in out
  assert "jlora:       loads it" in out


def test_inspect_of_a_directory_without_a_config_is_one_clear_error(tmp_path, capsys):
  assert main(["inspect", str(tmp_path)]) == 1
  assert "adapter_config.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------- convert


def test_convert_writes_the_same_tensors_as_safetensors(tmp_path):
  tensors = _fork_adapter(tmp_path / "mos", fmt="bin")
  assert main(["convert", str(tmp_path / "mos")]) == 0
  written = read_safetensors(tmp_path / "mos" / "adapter_model.safetensors")
  assert set(written) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(np.asarray(written[name], np.float32), value.float().numpy())
  assert str(written["base_model.model.lin.lora_B.weight"].dtype) == "bfloat16"
  assert sorted(p.name for p in (tmp_path / "mos").iterdir()) == [
      "adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"]


def test_convert_then_jlora_loads_the_fork_adapter(tmp_path):
  _fork_adapter(tmp_path / "mos", fmt="bin")
  assert main(["convert", str(tmp_path / "mos")]) == 0
  config, tensors = jlora.io.read_adapter(tmp_path / "mos")
  assert isinstance(config, jlora.MoSLoraConfig) and len(tensors) == 3


def test_convert_without_torch_says_how_to_install_it(tmp_path, monkeypatch, capsys):
  _fork_adapter(tmp_path / "mos", fmt="bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
  assert main(["convert", str(tmp_path / "mos")]) == 1
  assert "pip install torch" in capsys.readouterr().err
  assert not (tmp_path / "mos" / "adapter_model.safetensors").exists()


def test_convert_refuses_a_pickle_of_arbitrary_objects(tmp_path, capsys):
  (tmp_path / "a").mkdir()
  torch.save({"w": torch.zeros(2), "hook": print}, tmp_path / "a" / "adapter_model.bin")
  assert main(["convert", str(tmp_path / "a")]) == 1
  assert "weights-only" in capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_model.bin"]


def test_convert_does_not_replace_existing_safetensors_unless_told(tmp_path, capsys):
  _fork_adapter(tmp_path / "mos", fmt="bin")
  (tmp_path / "mos" / "adapter_model.safetensors").write_bytes(b"mine")
  assert main(["convert", str(tmp_path / "mos")]) == 1
  assert "--overwrite" in capsys.readouterr().err
  assert (tmp_path / "mos" / "adapter_model.safetensors").read_bytes() == b"mine"
  assert main(["convert", str(tmp_path / "mos"), "--overwrite"]) == 0


@pytest.mark.parametrize("command", ["train", "merge", "generate", "inspect", "convert"])
def test_every_command_has_help(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    main([command, "--help"])
  assert exit_.value.code == 0 and f"usage: jlora {command}" in capsys.readouterr().out
