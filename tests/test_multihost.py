"""Multi-host: ``jlora.train`` as 2 processes on localhost equals one process with the same global batch.

Each process is started like a real launch (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) with 2 simulated CPU devices, so
the job's mesh has 4 devices over 2 processes; the reference is the same job
in one process on one device (the same global batch). The 2-process job is
SIGKILLed (both processes) once a checkpoint is on disk (the job blocks there), restarted, and finished.
Tolerance: per-step losses within 1e-5 of the reference (the sharded job sums
its reductions in another order).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jlora.train import LaunchError
from jlora.train._distributed import launch_settings
from train_doubles import wait_until_blocked

TESTS = Path(__file__).parent
STEPS, BATCH = 8, 8
OVERRIDES = {"checkpoint.every": 2, "eval_every": 4, "adapter.lora_dropout": 0.1}
KILL_AT = 4  # both processes are killed once step 4's checkpoint is on disk: steps 5-8 run after the resume
JOB = """
import json, sys
from jlora.train import initialize_distributed
initialize_distributed()  # before the model is built
sys.path.insert(0, {tests!r})
from jlora.train import _data, _train as t
batch_at = _data.BatchStream.batch_at
rows_seen = set()
def counting_batch_at(self, index):
  batch = batch_at(self, index)
  rows_seen.add(len(batch["tokens"]))
  return batch
_data.BatchStream.batch_at = counting_batch_at
from train_doubles import block_after_checkpoint, run_tiny_job
if {kill_at}:
  block_after_checkpoint({kill_at}, {marker!r})  # the kill point: after this checkpoint is on disk
import jax
r = run_tiny_job({out!r}, steps={steps}, batch_size={batch}, **{overrides!r})
print("RESULT" + json.dumps({{"process": jax.process_index(), "processes": jax.process_count(),
      "losses": r.losses, "eval": [l for _, l in r.eval_losses], "rows": sorted(rows_seen),
      "resumed_from": r.resumed_from, "adapter": str(r.adapter_dir) if r.adapter_dir else None}}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out: Path, processes: int, devices: int, kill_at: int = 0) -> list[subprocess.Popen]:
  code = JOB.format(tests=str(TESTS), out=str(out), steps=STEPS, batch=BATCH, kill_at=kill_at,
                    marker=str(out) + ".blocked", overrides=OVERRIDES)
  port = _free_port()
  procs = []
  for rank in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(TESTS.parent))
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(rank))
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _results(procs) -> list[dict]:
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=900)  # a guard against a hung job; a busy machine is slow
    assert p.returncode == 0, stderr[-3000:]
    out.append(json.loads([l for l in stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):]))
  return sorted(out, key=lambda r: r["process"])


def _logged_losses(out: Path) -> list[float]:
  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
  return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  procs = _launch(root / "two", processes=2, devices=2, kill_at=KILL_AT)
  reference = _reference(root / "one")  # in this process (one device) while the job runs
  wait_until_blocked(procs, str(root / "two") + ".blocked")
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate()
  resumed = _results(_launch(root / "two", processes=2, devices=2))
  return reference, resumed, root / "two"


def _reference(out: Path) -> dict:
  import jax

  sys.path.insert(0, str(TESTS))
  from train_doubles import run_tiny_job

  assert jax.process_count() == 1
  r = run_tiny_job(out, steps=STEPS, batch_size=BATCH, **OVERRIDES)
  return {"losses": r.losses, "eval": [l for _, l in r.eval_losses]}


@pytest.mark.slow
def test_two_processes_resumed_after_a_kill_equal_one_process(runs):
  reference, resumed, out = runs
  assert [r["processes"] for r in resumed] == [2, 2]
  assert resumed[0]["resumed_from"] == resumed[1]["resumed_from"] == KILL_AT
  assert len(reference["losses"]) == STEPS
  assert _logged_losses(out) == pytest.approx(reference["losses"], abs=1e-5)
  for r in resumed:
    assert r["eval"] == pytest.approx(reference["eval"], abs=1e-5)


@pytest.mark.slow
def test_each_process_materialises_only_its_half_of_every_batch(runs):
  _, resumed, _ = runs
  assert [r["rows"] for r in resumed] == [[BATCH // 2], [BATCH // 2]]


@pytest.mark.slow
def test_only_process_zero_writes_the_adapter(runs):
  _, resumed, out = runs
  assert resumed[0]["adapter"] == str(out / "adapter") and resumed[1]["adapter"] is None
  assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("env, problem", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, "out of range"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES is not"),
    ({"JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "JAX_COORDINATOR_ADDRESS is not set"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "1"}, "not an integer"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "h"}, "not host:port"),
])
def test_an_inconsistent_launch_environment_is_one_clear_error(env, problem):
  with pytest.raises(LaunchError, match=problem) as e:
    launch_settings(env, cluster=False)
  assert "JAX_PROCESS_ID=0..N-1" in str(e.value)


def test_a_consistent_launch_environment_is_read():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert launch_settings(env, cluster=False) == ("10.0.0.1:1234", 4, 3)
  assert launch_settings({}, cluster=False) is None


def test_train_refuses_a_bad_launch_environment_before_anything_starts(tmp_path, monkeypatch):
  from jlora.train import TrainConfig, train

  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(LaunchError, match="JAX_PROCESS_ID is not"):
    train(TrainConfig(output_dir=str(tmp_path / "run")))
  assert not (tmp_path / "run").exists()
