"""Bad input to ``jlora train``: refused before any run directory is made or any compute,
overwrite removes only the run's own files, and a signal checkpoints and says how to resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jlora.train import ByteTokenizer, ConfigError, DataError, OutputDirError, load_config, read_records, train
from jlora.train._run_dir import check_output_dir, claim_output_dir
from train_doubles import CausalLM, tiny_job

TESTS = Path(__file__).parent


@pytest.mark.parametrize("override", ["optim.learning_rate=.nan", "optim.learning_rate=inf",
                                      "adapter.lora_alpha=nan", "optim.weight_decay=-.inf"])
def test_nan_or_inf_in_a_float_field_is_a_config_error(override):
  key = override.split("=")[0]
  with pytest.raises(ConfigError, match=f"{key.rsplit('.', 1)[-1]} must be a finite number"):
    load_config(None, [override])


def test_a_nan_learning_rate_fails_before_the_run_directory_exists(tmp_path):
  with pytest.raises(ConfigError, match="optim.learning_rate must be a finite number"):
    train(tiny_job(tmp_path / "run", **{"optim.learning_rate": float("nan")}), model=CausalLM())
  assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
  (tmp_path / "run").write_text("")
  with pytest.raises(OutputDirError, match="output_dir '.*run' is an existing file"):
    train(tiny_job(tmp_path / "run"), model=CausalLM(), tokenizer=ByteTokenizer())


def test_overwrite_removes_only_what_the_previous_run_wrote(tmp_path):
  claim_output_dir(tmp_path, {"steps": 1})
  for name in ("checkpoints/1", "adapter", "merged"):
    (tmp_path / name).mkdir(parents=True)
  for name in ("metrics.jsonl", "loss_curve.png", "samples.txt", "notes.txt", "data/train.jsonl"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("x")
  decision = check_output_dir(tmp_path, {"steps": 2}, overwrite=True)
  claim_output_dir(tmp_path, {"steps": 2}, decision)
  assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
      "data", "data/train.jsonl", "notes.txt", "run.json"]
  assert json.loads((tmp_path / "run.json").read_text())["config"] == {"steps": 2}


def test_a_read_only_output_dir_names_the_path_and_the_fix(tmp_path, monkeypatch):
  def denied(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(self))

  monkeypatch.setattr(Path, "mkdir", denied)
  with pytest.raises(OutputDirError, match="Cannot write the run to output_dir '.*run': permission denied.*chmod"):
    claim_output_dir(tmp_path / "run", {"steps": 1})


def test_binary_garbage_in_a_jsonl_names_the_file_and_line(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"text": "fine"}\n\x89PNG\r\n\x1a\n\xff\xfe\n')
  with pytest.raises(DataError, match=r"data\.jsonl:2: not UTF-8 text"):
    read_records(path)


@pytest.mark.parametrize("name", ["data.json", "data.txt"])
def test_binary_garbage_in_a_json_or_text_file_names_the_file(tmp_path, name):
  (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
  with pytest.raises(DataError, match=rf"{name}: not UTF-8 text"):
    read_records(tmp_path / name)


class OffsetTokenizer(ByteTokenizer):
  """Claims the byte vocabulary but emits ids past it: a tokenizer of another model."""

  def encode(self, text):
    return [i + 1000 for i in super().encode(text)]


def test_token_ids_outside_the_vocabulary_fail_before_the_run_directory_exists(tmp_path):
  with pytest.raises(DataError, match=r"token id \d+ is outside the model's vocabulary \[0, \d+\)"):
    train(tiny_job(tmp_path / "run"), model=CausalLM(), tokenizer=OffsetTokenizer())
  assert not (tmp_path / "run").exists()


# ---- signals ----------------------------------------------------------------------------

JOB = ("import sys; sys.path.insert(0, {tests!r})\n"
       "import train_doubles as d\n"
       "from jlora.train import register_preset\n"
       "register_preset('double', lambda cfg: d.CausalLM(seed=cfg.seed))\n"
       "from jlora.cli import main\n"
       "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
  args = ["train", "--set", "model.name=double", "--set", f"output_dir={tmp_path / 'run'}", "--set", "steps=100000",
          "--set", "progress=false", "--set", "log_every=1", "--set", "data.seq_len=32", "--set", "batch_size=2",
          "--set", "samples=0", "--set", "eval_batches=1", "--set", "checkpoint.every=100000"]
  proc = subprocess.Popen([sys.executable, "-c", JOB.format(tests=str(TESTS)), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu",
                                                                        PYTHONUNBUFFERED="1"))
  try:
    deadline = time.monotonic() + 240
    while not proc.stdout.readline().startswith("step 2:"):  # training, and past compile
      assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 128 + sig, err[-3000:]
  assert "Traceback" not in err
  (line,) = [l for l in err.splitlines() if l.startswith("jlora:")]
  step = int(line.split(" at step ")[1].split("/")[0])
  assert f"stopped by {sig.name} at step {step}/100000" in line and "again to resume" in line
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [str(step)]


def _signal_at_step(monkeypatch, step: int, again_during_save: bool = False):
  """Deliver SIGINT to this process once step ``step`` is logged, and (``again_during_save``) a second
  SIGINT while that step's checkpoint is being saved: what two quick Ctrl-Cs do, at fixed points."""
  from jlora.train import _checkpoint, _train

  class SignallingMetrics(_train.Metrics):
    def log(self, record):
      super().log(record)
      if record.get("step") == step and "loss" in record:
        signal.raise_signal(signal.SIGINT)

  save = _checkpoint.Checkpointer.save

  def save_then_signal(self, at, state, meta):
    save(self, at, state, meta)
    if again_during_save and at == step:
      signal.raise_signal(signal.SIGINT)

  monkeypatch.setattr(_train, "Metrics", SignallingMetrics)
  monkeypatch.setattr(_checkpoint.Checkpointer, "save", save_then_signal)


def test_a_second_sigint_during_the_save_waits_for_it_and_says_so(tmp_path, monkeypatch, capsys):
  from jlora.train import TrainingInterrupted

  _signal_at_step(monkeypatch, 2, again_during_save=True)
  job = tiny_job(tmp_path / "run", **{"checkpoint.every": 100, "checkpoint.async_save": True})
  try:
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 2/12"):
      train(job, model=CausalLM(), tokenizer=ByteTokenizer())
  except KeyboardInterrupt:
    pytest.fail("the second SIGINT broke off the save")
  assert "SIGINT again: stopping once the checkpoint of this step is written" in capsys.readouterr().err
  checkpoints = tmp_path / "run" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]  # complete, no *.orbax-checkpoint-tmp


def test_a_resumed_job_says_from_which_step(tmp_path, monkeypatch, capsys):
  from jlora.train import TrainingInterrupted

  job = tiny_job(tmp_path / "run", **{"checkpoint.every": 100})
  with monkeypatch.context() as patch:
    _signal_at_step(patch, 3)
    with pytest.raises(TrainingInterrupted):
      train(job, model=CausalLM(), tokenizer=ByteTokenizer())
  capsys.readouterr()
  train(job, model=CausalLM(), tokenizer=ByteTokenizer())
  assert "jlora: resuming from step 3 of 12" in capsys.readouterr().err


def test_an_interrupt_during_start_up_is_one_line(tmp_path, monkeypatch, capsys):
  from jlora.cli import main
  from jlora.train import _presets

  def interrupted_loading(cfg):
    raise KeyboardInterrupt

  monkeypatch.setitem(_presets._PRESETS, "interrupted", interrupted_loading)
  assert main(["train", "--set", "model.name=interrupted", "--set", f"output_dir={tmp_path / 'run'}"]) == 130
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and err.startswith("jlora: interrupted") and "Traceback" not in err
