"""The default job: the shipped base (``byte-stories``) writes stories, and ``jlora train`` teaches it Q/A."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jlora.train import ByteTokenizer, TrainConfig
from jlora.train._corpus import COLORS
from jlora.train._presets import BASE_DIR

ROOT = Path(__file__).parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def test_the_default_job_fine_tunes_the_shipped_base():
  assert TrainConfig().model.name == "byte-stories" and (BASE_DIR / "model.safetensors").is_file()


def test_the_shipped_base_is_a_few_megabytes():
  assert sum(p.stat().st_size for p in BASE_DIR.iterdir()) < 8_000_000


def test_the_shipped_base_writes_stories():
  from jlora._cli._common import load_base
  from jlora.train._report import continue_prompts

  model, _ = load_base("byte-stories")
  model.eval()
  (text,) = continue_prompts(model, ByteTokenizer(), ["Mia had a"], 8)
  assert text.split()[0] in COLORS  # "Mia had a <color> <thing>." as every story begins


@pytest.mark.slow
def test_the_pretraining_script_is_reproducible_from_its_seed(tmp_path):
  def run(out):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_base.py"), "--steps", "3", "--stories", "200",
                    "--batch-size", "4", "--out", str(out)], check=True, capture_output=True, env=ENV, timeout=600)
    return (out / "model.safetensors").read_bytes()

  assert run(tmp_path / "a") == run(tmp_path / "b")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """``(stdout, output_dir)`` of ``jlora train`` with every default but the output dir and the bar."""
  out = tmp_path_factory.mktemp("demo") / "run"
  proc = subprocess.run([sys.executable, "-m", "jlora.cli", "train", "--set", f"output_dir={out}", "--set",
                         "progress=false"], capture_output=True, text=True, timeout=1200, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, out


@pytest.mark.slow
def test_the_adapters_held_out_loss_is_a_fraction_of_the_bases(demo):
  (line,) = [l for l in demo[0].splitlines() if l.startswith("held-out loss:")]
  base, adapted = (float(x) for x in re.findall(r"(\d+\.\d+) \(step", line))
  assert "the base" in line and adapted < base / 4


@pytest.mark.slow
def test_the_same_questions_are_answered_before_and_after(demo):
  lines = demo[0].splitlines()
  answers = [(lines[i], lines[i + 1], lines[i + 2]) for i, l in enumerate(lines) if l.startswith("prompt:")]
  assert len(answers) == 3
  for prompt, base, adapter in answers:
    assert "Q: " in prompt and base.lstrip().startswith("base:") and adapter.lstrip().startswith("adapter:")
    assert re.match(r"\s*adapter: '(It is \w+\.|\d+\.)'$", adapter)  # the answer format it learned
    assert not re.match(r"\s*base: '(It is|\d)", base)


@pytest.mark.slow
def test_the_default_job_writes_adapter_samples_and_tensorboard_events(demo):
  out = demo[1]
  assert "reload max abs diff" in demo[0]
  assert (out / "adapter" / "adapter_model.safetensors").is_file()
  assert "base:" in (out / "samples.txt").read_text()
  assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_the_demo_adapter_merges_into_a_checkpoint_transformers_loads(demo, tmp_path):
  import torch
  from transformers import AutoModelForCausalLM

  import jlora
  from jlora._cli._common import load_base
  from jlora.cli import main

  adapter = demo[1] / "adapter"
  assert main(["merge", "byte-stories", str(adapter), str(tmp_path / "merged")]) == 0
  ids = np.asarray([ByteTokenizer().encode("Ada has a red hat.\nQ: What color is the hat?\nA: ")])
  with torch.no_grad():
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(torch.as_tensor(ids)).logits.numpy()
  model = jlora.load_peft(load_base("byte-stories")[0], adapter)
  model.eval()
  np.testing.assert_allclose(got, np.asarray(model(ids)), atol=2e-4)
