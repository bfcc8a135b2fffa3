"""``jlora train``: config file + --set overrides, clear errors, a real run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jlora.cli import main

TESTS = Path(__file__).parent


def test_print_config_applies_file_and_overrides(tmp_path, capsys):
  path = tmp_path / "job.yaml"
  path.write_text("steps: 5\n")
  assert main(["train", str(path), "--set", "optim.learning_rate=0.25", "--print-config"]) == 0
  cfg = yaml.safe_load(capsys.readouterr().out)
  assert cfg["steps"] == 5 and cfg["optim"]["learning_rate"] == 0.25


def test_no_config_prints_the_embedded_default(capsys):
  assert main(["train", "--print-config"]) == 0
  assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == "byte-stories"


def test_bad_override_exits_2_with_the_key(capsys):
  assert main(["train", "--set", "optim.lr=1", "--print-config"]) == 2
  assert "optim.lr" in capsys.readouterr().err


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
  assert main(["train", str(tmp_path / "nope.yaml")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_bad_input_exits_1_before_training(tmp_path, capsys):
  (tmp_path / "junk.txt").write_text("x")
  assert main(["train", "--set", f"output_dir={tmp_path}", "--set", "progress=false"]) == 1
  assert "holds no jlora run" in capsys.readouterr().err


@pytest.mark.slow
def test_train_runs_a_job_and_reports_the_adapter(tmp_path):
  script = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
            "import train_doubles as d\n"
            "from jlora.train import register_preset\n"
            "register_preset('double', lambda cfg: d.CausalLM(seed=cfg.seed))\n"
            "from jlora.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
  args = ["train", "--set", "model.name=double", "--set", f"output_dir={tmp_path / 'run'}", "--set", "steps=6",
          "--set", "eval_every=3", "--set", "data.seq_len=32", "--set", "batch_size=4", "--set", "samples=1",
          "--set", "checkpoint.async_save=false"]
  proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "held-out loss:" in proc.stdout and "adapter saved to" in proc.stdout
  assert (tmp_path / "run" / "adapter").is_dir()

