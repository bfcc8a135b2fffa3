"""Run reporting: TensorBoard events and wandb beside metrics.jsonl, the progress bar's rate and ETA, sample prompts."""

import importlib.util
import sys
import types

import numpy as np
import pytest

from jlora.train import ByteTokenizer, TrainConfig
from jlora.train._data import encode_record, eval_batches, pack
from jlora.train._report import Metrics, Progress, check_report, open_sinks, sample_prompts


def _events(logdir):
  """``{tag: [(step, value)]}`` read back from the event files with tensorboardX's own protobufs."""
  import struct

  from tensorboardX.proto import event_pb2 as pb

  out = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])  # TFRecord: length, crc, payload, crc
      event = pb.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, round(v.simple_value, 4)))
  return out


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_tensorboard_gets_every_numeric_metric_by_step(tmp_path):
  sinks = open_sinks(TrainConfig().report, tmp_path, {}, None)
  metrics = Metrics(tmp_path / "metrics.jsonl", sinks=sinks)
  metrics.log({"step": 1, "loss": 2.5, "tokens": 64})
  metrics.log({"step": 2, "loss": 2.0, "tokens": 64, "eval_loss": 1.5})
  metrics.close()
  events = _events(tmp_path / "tensorboard")
  assert events["loss"] == [(1, 2.5), (2, 2.0)] and events["eval_loss"] == [(2, 1.5)]


def test_tensorboard_can_be_turned_off(tmp_path):
  report = TrainConfig().replace(**{"report.tensorboard": False}).report
  assert open_sinks(report, tmp_path, {}, None) == []


def test_wandb_logs_the_same_records_when_asked(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, data, step):
      calls.append(("log", data, step))

    def finish(self):
      calls.append(("finish",))

  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: calls.append(("init", kw)) or Run()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  report = TrainConfig().replace(**{"report.wandb": True, "report.tensorboard": False,
                                    "report.wandb_project": "demo"}).report
  metrics = Metrics(tmp_path / "metrics.jsonl", sinks=open_sinks(report, tmp_path, {"steps": 3}, None))
  metrics.log({"step": 1, "loss": 2.5})
  metrics.close()
  assert calls[0] == ("init", {"project": "demo", "name": None, "config": {"steps": 3}, "dir": str(tmp_path)})
  assert calls[1:] == [("log", {"loss": 2.5}, 1), ("finish",)]


def test_a_job_logs_each_step_to_tensorboard_and_wandb(tmp_path, monkeypatch):
  from train_doubles import run_tiny_job

  logged = []
  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: types.SimpleNamespace(log=lambda data, step: logged.append(step), finish=lambda: None)
  monkeypatch.setitem(sys.modules, "wandb", fake)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
  run_tiny_job(tmp_path / "run", steps=2, eval_every=2, **{"report.wandb": True})
  assert logged == [0, 1, 2]  # the base's held-out loss, then each step
  assert [s for s, _ in _events(tmp_path / "run" / "tensorboard")["loss"]] == [1, 2]


def test_wandb_asked_for_but_not_installed_is_one_clear_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(ValueError, match=r"report\.wandb=true needs the wandb package.*pip install wandb"):
    check_report(TrainConfig().replace(**{"report.wandb": True}).report)


def test_rate_and_eta_leave_out_the_first_steps_compile_time():
  clock = FakeClock()
  progress = Progress(total=10, initial=0, enabled=False, clock=clock)
  clock.now = 30.0  # step 1: compiling
  assert progress.update(1.0, tokens=100) is None and progress.eta is None
  for _ in range(4):  # steps 2-5 take 0.5 s each
    clock.now += 0.5
    rate = progress.update(1.0, tokens=100)
  assert rate == pytest.approx(200.0)
  assert progress.eta == pytest.approx(5 * 0.5)


def test_a_resumed_run_counts_its_eta_from_the_resumed_step():
  clock = FakeClock()
  progress = Progress(total=10, initial=6, enabled=False, clock=clock)
  for _ in range(2):
    clock.now += 1.0
    progress.update(1.0, tokens=10)
  assert progress.eta == pytest.approx(2 * 1.0)


def _held_out(records, seq_len=64):
  tok = ByteTokenizer()
  rows = pack([encode_record(r, "test", tok) for r in records], seq_len, tok.pad_id)
  return eval_batches(rows, 2)


def test_sample_prompts_are_instruction_prompts_first_then_story_openings():
  records = [{"text": "Mia had a red ball and a hat."},
             {"prompt": "Q: What is 1 plus 2?\nA: ", "completion": "3."},
             {"text": "Tom went to the park with a dog."}]
  prompts = sample_prompts(ByteTokenizer(), _held_out(records, seq_len=256), 2)
  assert prompts == ["Q: What is 1 plus 2?\nA: ", "Tom went to "]


def test_sample_prompts_skip_a_record_cut_by_the_row_start():
  records = [{"text": "x" * 70}, {"text": "Ada had a blue kite."}]
  held_out = _held_out(records, seq_len=64)
  assert sample_prompts(ByteTokenizer(), held_out, 3) == ["Ada had a bl"]


def test_sample_prompts_of_records_longer_than_a_row_are_row_openings():
  held_out = _held_out([{"text": "Once there was a very long story " * 6}], seq_len=64)
  assert sample_prompts(ByteTokenizer(), held_out, 1) == ["Once there w"]


@pytest.fixture(scope="module")
def short_job(tmp_path_factory):
  from train_doubles import run_tiny_job

  return run_tiny_job(tmp_path_factory.mktemp("short") / "run", steps=3, eval_every=3)


def test_each_step_logs_lr_grad_norm_and_both_token_counts(short_job):
  import optax

  steps = [r for r in short_job.history if "loss" in r]
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=2, decay_steps=3, end_value=3e-3)
  assert [r["lr"] for r in steps] == pytest.approx([float(schedule(s)) for s in range(3)])
  assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
  # the Q/A records' prompts are masked: fewer trained tokens than processed ones, all within the batch
  assert all(0 < r["trained_tokens"] < r["tokens"] <= 4 * 32 for r in steps)


def test_tokens_per_second_starts_at_step_two(short_job):
  steps = [r for r in short_job.history if "loss" in r]
  assert "tokens_per_s" not in steps[0] and all(r["tokens_per_s"] > 0 for r in steps[1:])


def test_tensorboard_shows_the_learning_rate_grad_norm_and_token_counts(short_job):
  events = _events(short_job.output_dir / "tensorboard")
  for tag in ("lr", "grad_norm", "tokens", "trained_tokens"):
    assert [s for s, _ in events[tag]] == [1, 2, 3], tag
