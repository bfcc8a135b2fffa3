"""``jlora merge`` / ``jlora generate``: a bad adapter directory, tokenizer or prompt is one clear error
before the base model's weights are loaded (minutes on a large model)."""

import json
import re
import shutil

import numpy as np
import pytest

import jlora
from jlora._cli import _generate, _merge
from jlora._cli._common import load_base
from jlora.cli import main
from jlora.io import _safetensors
from jlora.testing import randomize_adapters

torch = pytest.importorskip("torch")
import hf_doubles  # noqa: E402  (needs torch)

WEIGHTS = "adapter_model.safetensors"


def _adapter(model, directory):
  jlora.get_peft_model(model, jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
  randomize_adapters(model, scale=0.3)
  jlora.save_peft(model, directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """``{"base", "adapter", "other"}``: a tiny Llama (no tokenizer files), its adapter, an adapter of another base."""
  root = tmp_path_factory.mktemp("check")
  hf_doubles.save("llama", root / "base")
  _adapter(jlora.from_pretrained(root / "base", dtype=np.float32), root / "adapter")
  _adapter(load_base("tiny")[0], root / "other")
  return {name: root / name for name in ("base", "adapter", "other")}


@pytest.fixture(autouse=True)
def no_base_loading(monkeypatch):
  """Loading the base fails the test: every case here must be refused before it."""
  def refuse(*args, **kwargs):
    raise AssertionError("the base model was loaded before the bad input was found")

  monkeypatch.setattr(_merge, "load_base", refuse)
  monkeypatch.setattr(_generate, "load_base", refuse)


def _copy(dirs, tmp_path):
  return shutil.copytree(dirs["adapter"], tmp_path / "adapter")


def _edit_config(directory, **changes):
  path = directory / "adapter_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def missing(dirs, tmp_path):
  return tmp_path / "nope", "does not exist"


def base_as_adapter(dirs, tmp_path):
  return dirs["base"], "is a model checkpoint, not a PEFT adapter"


def another_base(dirs, tmp_path):
  return dirs["other"], "does not fit the base model"


def rank_mismatch(dirs, tmp_path):
  _edit_config(_copy(dirs, tmp_path), r=8)
  return tmp_path / "adapter", r"adapter_config.json.s r/rank_pattern gives .* rank 8"


def truncated(dirs, tmp_path):
  path = _copy(dirs, tmp_path) / WEIGHTS
  path.write_bytes(path.read_bytes()[:-40])
  return tmp_path / "adapter", WEIGHTS


def random_bytes(dirs, tmp_path):
  (_copy(dirs, tmp_path) / WEIGHTS).write_bytes(np.random.default_rng(0).bytes(300))
  return tmp_path / "adapter", WEIGHTS


def unknown_field(dirs, tmp_path):
  _edit_config(_copy(dirs, tmp_path), surprise=3)
  return tmp_path / "adapter", "unknown field surprise"


def not_lora(dirs, tmp_path):
  _edit_config(_copy(dirs, tmp_path), peft_type="IA3")
  return tmp_path / "adapter", "peft_type='IA3'"


def bin_only(dirs, tmp_path):
  directory = _copy(dirs, tmp_path)
  (directory / WEIGHTS).rename(directory / "adapter_model.bin")
  return directory, "only pickled weights"


def bad_json(dirs, tmp_path):
  (_copy(dirs, tmp_path) / "adapter_config.json").write_text("{r: 2,")
  return tmp_path / "adapter", "is not valid JSON"


def nan_weights(dirs, tmp_path):
  directory = _copy(dirs, tmp_path)
  tensors = dict(_safetensors.read(directory / WEIGHTS))
  name = sorted(tensors)[0]
  tensors[name] = np.full_like(tensors[name], np.nan)
  _safetensors.write(tensors, directory / WEIGHTS)
  return directory, "NaN or inf"


CASES = [missing, base_as_adapter, another_base, rank_mismatch, truncated, random_bytes, unknown_field, not_lora,
         bin_only, bad_json, nan_weights]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_merge_refuses_a_bad_adapter_before_loading_the_base(case, dirs, tmp_path, capsys):
  adapter, message = case(dirs, tmp_path)
  assert main(["merge", str(dirs["base"]), str(adapter), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("jlora: error:") and re.search(message, err), err
  assert not (tmp_path / "out").exists()


def llama_adapter_on_tiny(dirs, tmp_path):
  return dirs["adapter"], "does not fit the base model"


GENERATE_CASES = [llama_adapter_on_tiny, truncated, missing, bin_only]


@pytest.mark.parametrize("case", GENERATE_CASES, ids=[c.__name__ for c in GENERATE_CASES])
def test_generate_refuses_a_bad_adapter_before_loading_the_base(case, dirs, tmp_path, capsys):
  adapter, message = case(dirs, tmp_path)
  assert main(["generate", "tiny", "--adapter", str(dirs["other"]), "--adapter", str(adapter), "--prompt", "hi"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("jlora: error:") and re.search(message, err), err


def test_generate_without_tokenizer_files_says_so_before_loading_the_base(dirs, capsys):
  assert main(["generate", str(dirs["base"]), "--prompt", "hi"]) == 1
  assert "no tokenizer files" in capsys.readouterr().err


def test_generate_refuses_the_byte_tokenizer_on_a_smaller_vocabulary_before_loading(dirs, capsys):
  assert main(["generate", str(dirs["base"]), "--tokenizer", "bytes", "--prompt", "hi"]) == 1
  assert f"the model only {hf_doubles.VOCAB}" in capsys.readouterr().err


def test_a_missing_tokenizer_dir_is_named_as_the_tokenizer_option(dirs, tmp_path, capsys):
  assert main(["generate", str(dirs["base"]), "--tokenizer", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
  err = capsys.readouterr().err
  assert "--tokenizer" in err and "nope" in err and "data.tokenizer" not in err


def test_an_empty_prompt_is_refused_before_loading_the_base(capsys):
  assert main(["generate", "tiny", "--prompt", ""]) == 1
  assert "--prompt is empty" in capsys.readouterr().err
