"""``jlora.train``: a real (tiny) job end to end, and bad input refused before any compute."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jlora.train import DataError, MeshError, NonFiniteLossError, OutputDirError
from train_doubles import CausalLM, run_tiny_job


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  return run_tiny_job(tmp_path_factory.mktemp("job") / "run", samples=1)


def test_held_out_loss_falls(job):
  (_, first), (_, last) = job.eval_losses[0], job.eval_losses[-1]
  assert job.eval_losses[0][0] == 0 and last < first - 0.3


def test_metrics_file_has_one_record_per_step(job):
  records = [json.loads(l) for l in job.metrics_path.read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
  assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in records if "loss" in r)


def test_adapter_reloads_and_merges_to_the_same_logits(job):
  assert job.adapter_dir.is_dir() and any(job.adapter_dir.iterdir())
  assert job.checks["reload_max_abs_diff"] < 1e-5
  assert job.checks["merge_max_abs_diff"] < 1e-4


def test_loss_curve_and_samples_are_written(job):
  assert job.plot_path.read_bytes()[:4] == b"\x89PNG"
  assert len(job.samples) == 1 and (job.output_dir / "samples.txt").exists()


def test_only_the_adapter_changes(job):
  before = nnx.state(CausalLM(), nnx.Param)
  after = nnx.state(job.model, nnx.Param)
  flat_after = {p: v for p, v in nnx.to_flat_state(after)}
  for path, value in nnx.to_flat_state(before):
    adapted = path[:-1] + ("base_layer",) + path[-1:]
    np.testing.assert_array_equal(value[...], flat_after.get(path, flat_after.get(adapted))[...])


def test_diverging_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(NonFiniteLossError, match=r"loss became .* last good checkpoint is step \d"):
    run_tiny_job(tmp_path / "run", **{"optim.learning_rate": 1e30, "optim.warmup_steps": 0,
                                      "optim.grad_clip": 0.0, "checkpoint.every": 1, "steps": 8})
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 8


# ---------------------------------------------------------------- bad input, before any compute


def _no_compute(path):
  return not (path / "checkpoints").exists()


def test_output_dir_with_a_different_run_is_refused(tmp_path, job):
  out = job.output_dir
  with pytest.raises(OutputDirError, match=r"different run.*optim\.learning_rate.*overwrite"):
    run_tiny_job(out, **{"optim.learning_rate": 0.5})


def test_non_empty_dir_that_is_no_run_is_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(OutputDirError, match="holds no jlora run"):
    run_tiny_job(tmp_path)


def test_sequence_longer_than_the_model_allows_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"seq_len=128 is over the model's maximum of 64"):
    run_tiny_job(tmp_path / "run", **{"data.seq_len": 128})
  assert not (tmp_path / "run").exists()


def test_mesh_that_does_not_divide_the_devices_is_refused(tmp_path):
  with pytest.raises(MeshError, match="devices"):
    run_tiny_job(tmp_path / "run", **{"mesh.data": jax.device_count() + 1})
  assert not (tmp_path / "run").exists()


def test_malformed_data_file_is_refused_with_its_line(tmp_path):
  data = tmp_path / "d.jsonl"
  data.write_text('{"text": "fine"}\n\n{"text": 3}\n')
  with pytest.raises(DataError, match=r"d\.jsonl:3"):
    run_tiny_job(tmp_path / "run", **{"data.path": str(data)})
  assert not (tmp_path / "run").exists()


def test_grad_accumulation_steps_consume_several_micro_batches(tmp_path):
  one = run_tiny_job(tmp_path / "one", steps=2, eval_every=2, samples=0)
  two = run_tiny_job(tmp_path / "two", steps=1, eval_every=1, samples=0, **{"optim.grad_accum": 2})
  tokens = lambda r: [h["tokens"] for h in r.history if "tokens" in h]
  assert tokens(two) == [sum(tokens(one))]


def test_rerunning_a_finished_job_resumes_from_its_last_checkpoint(tmp_path):
  run_tiny_job(tmp_path / "run", steps=4, eval_every=4)
  again = run_tiny_job(tmp_path / "run", steps=4, eval_every=4)
  assert again.resumed_from == 4 and len(again.losses) == 4


def test_wlora_job_trains_only_the_mixing_logits(tmp_path):
  import jlora
  from jlora.train import ByteTokenizer, train
  from jlora.testing import randomize_adapters
  from train_doubles import tiny_job

  model = CausalLM()
  for i, name in enumerate(("a", "b")):
    jlora.add_adapter(model, name, jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], seed=i))
  randomize_adapters(model, seed=3, scale=0.1)
  upstream = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(model, jlora.LoraParam))}
  cfg = tiny_job(tmp_path / "run", steps=3, eval_every=3, **{"adapter.kind": "wlora",
                                                              "adapter.upstream_loras": ["a", "b"]})
  result = train(cfg, model=model, tokenizer=ByteTokenizer())
  after = dict(nnx.to_flat_state(nnx.state(result.model, jlora.LoraParam)))


  def before(path):  # WLoRA upstream k started as a copy of adapter "a" / "b"
    if "upstreams" in path:
      i = path.index("upstreams")
      path = path[:i - 1] + ("ab"[path[i + 1]],) + path[i + 2:]
    return upstream.get(path)

  changed = {p[-2:] for p, v in after.items() if before(p) is None or not np.array_equal(v[...], before(p))}
  assert changed == {("default", "logits")}
  assert result.checks["reload_max_abs_diff"] < 1e-5


def test_overwrite_replaces_a_different_run(tmp_path):
  run_tiny_job(tmp_path / "run", steps=2, eval_every=2)
  again = run_tiny_job(tmp_path / "run", steps=3, eval_every=3, overwrite=True)
  assert again.resumed_from is None and len(again.losses) == 3


def test_adapter_that_matches_no_layer_is_refused_before_claiming_the_dir(tmp_path):
  with pytest.raises(ValueError, match="nope_proj"):
    run_tiny_job(tmp_path / "run", **{"adapter.target_modules": ["nope_proj"]})
  assert not (tmp_path / "run").exists()


def test_the_model_makes_room_for_the_most_records_a_packed_row_holds(tmp_path):
  from jlora.train import ByteTokenizer, segment_bound, train
  from jlora.train._train import _prepare_data
  from train_doubles import tiny_job

  cfg = tiny_job(tmp_path / "run", **{"model.name": "tiny", "steps": 2, "eval_every": 2, "checkpoint.every": 2})
  result = train(cfg, tokenizer=ByteTokenizer())
  rows = _prepare_data(cfg, ByteTokenizer())
  assert result.model.max_segments == max(segment_bound(r.segment_ids) for r in rows) >= 2


def test_the_train_step_compiles_once(tmp_path, caplog):
  import logging

  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    run_tiny_job(tmp_path / "run", steps=3, eval_every=3)
  compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(train_step) ")]
  assert len(compiles) == 1
