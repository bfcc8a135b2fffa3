"""Resume: a job SIGKILLed mid-run and restarted continues bit-for-bit, losing no checkpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_doubles import wait_until_blocked

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
KILL_AT = 10  # the first run is killed right after it starts saving step 10 (async: maybe mid-save)
JOB = """
import sys
sys.path.insert(0, {tests!r})
from train_doubles import block_after_checkpoint, run_tiny_job
if {kill}:
  block_after_checkpoint({kill_at}, {marker!r}, wait=False)
run_tiny_job({out!r}, steps=24, **{{"checkpoint.every": 2, "checkpoint.async_save": True,
             "checkpoint.keep": 3, "adapter.lora_dropout": 0.1}})
"""


def _start(out: Path, kill: bool = False) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  code = JOB.format(tests=str(TESTS), out=str(out), kill=kill, kill_at=KILL_AT, marker=f"{out}.blocked")
  return subprocess.Popen([sys.executable, "-c", code], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _losses(out: Path) -> dict[int, float]:
  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _finish(proc: subprocess.Popen) -> None:
  _, err = proc.communicate(timeout=900)  # a guard against a hung job; a busy machine is slow
  assert proc.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  whole, killed = root / "whole", root / "killed"
  _finish(_start(whole))
  proc = _start(killed, kill=True)
  wait_until_blocked([proc], f"{killed}.blocked")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  from jlora.train import Checkpointer

  steps_after_kill = Checkpointer(killed / "checkpoints").all_steps()
  _finish(_start(killed))
  return whole, killed, steps_after_kill


def test_losses_after_resume_equal_the_uninterrupted_run_bitwise(runs):
  whole, killed, _ = runs
  assert _losses(killed) == _losses(whole)
  assert len(_losses(whole)) == 24


def test_the_killed_run_had_checkpoints_to_resume_from(runs):
  _, _, steps = runs
  assert max(steps) >= KILL_AT - 2  # every save before the kill point is complete


def test_every_kept_checkpoint_restores_completely(runs):
  import numpy as np
  import orbax.checkpoint as ocp

  _, killed, _ = runs
  directory = killed / "checkpoints"
  assert not [p.name for p in directory.iterdir() if "tmp" in p.name]
  manager = ocp.CheckpointManager(directory)
  assert manager.all_steps() == [20, 22, 24]
  for step in manager.all_steps():
    restored = manager.restore(step)
    assert restored["meta"]["step"] == step
    assert all(np.all(np.isfinite(np.asarray(x))) for x in restored["state"].values())
