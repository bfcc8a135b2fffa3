"""``jlora.train(cfg)``: the whole job, from config to a saved PEFT adapter.

Order matters: every input is validated (config, output dir, model, data,
mesh) before anything is compiled, so bad input fails in seconds with one
message. Then: inject the adapter, shard, resume from the newest checkpoint
if there is one, train (checkpointing every ``checkpoint.every`` steps and at
the end), evaluate held-out loss, and write the adapter, metrics, loss curve
and samples under ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora.models import LanguageModel, check_attention
from jlora.nn import disable_adapters, set_lora_matmul
from jlora.train import _data, _distributed, _memory_fit, _sharding, _steps
from jlora.train._checkpoint import Checkpointer
from jlora.train._config import TrainConfig
from jlora.train._compile_cache import enable_compile_cache
from jlora.train._config_sections import planned_adapter
from jlora.train._model import add_adapter, check_tokenizer_fits, load_model, max_length, set_attention, vocab_size
from jlora.train._report import (
    Metrics, Progress, check_report, greedy_samples, open_sinks, plot_losses, sample_prompts, write_samples)
from jlora.train._run_dir import check_output_dir, claim_output_dir
from jlora.train._tokenizer import load_tokenizer
from jlora.train._export import export_adapter


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT (Ctrl-C) or SIGTERM (e.g. preemption) stopped the run after saving a checkpoint.

  ``str(e)`` is one line saying where the checkpoint is and how to resume;
  ``e.signum`` is the signal's number.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class _StopSignals:
  """While active, SIGINT/SIGTERM only set ``signum``; the loop then checkpoints and stops.

  A second signal says the job is stopping once the checkpoint is written
  (breaking off the save would lose the step); a third gets the previous
  handler (Ctrl-C: KeyboardInterrupt, after which the job still waits for
  the save as it closes; SIGTERM: the process ends at once).
  """

  def __init__(self):
    self.signum, self._previous, self._repeats = None, {}, 0

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is None:
      self.signum = signum
      return
    self._repeats += 1
    name = signal.Signals(signum).name
    if self._repeats == 1:
      print(f"jlora: {name} again: stopping once the checkpoint of this step is written.", file=sys.stderr,
            flush=True)
      return
    self.__exit__()
    signal.raise_signal(signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  """What a run produced.

  Attributes:
    model: the model with the trained adapter (not merged).
    history: every metrics record of the run (``metrics.jsonl``), resumed parts included.
    eval_losses: ``[(step, held-out loss)]``.
    resumed_from: the checkpoint step the run resumed from, or None.
    adapter_dir: the adapter as written by ``jlora.save_peft``.
    checks: reload/merge checks: max |logit difference| of the reloaded and merged models.
    samples: greedy continuations of ``sample_prompts`` (prompt included) with the adapter;
      ``base_samples`` the same without it (the base model).
  """

  model: nnx.Module
  output_dir: Path
  history: list[dict]
  eval_losses: list[tuple[int, float]]
  resumed_from: int | None
  adapter_dir: Path | None
  merged_dir: Path | None
  metrics_path: Path
  plot_path: Path | None
  samples: list[str]
  checks: dict[str, float]
  sample_prompts: list[str] = dataclasses.field(default_factory=list)
  base_samples: list[str] = dataclasses.field(default_factory=list)

  @property
  def losses(self) -> list[float]:
    """Train loss of every optimizer step, in order."""
    return [r["loss"] for r in self.history if "loss" in r]


def _prepare_data(cfg: TrainConfig, tokenizer):
  path = cfg.data.path or str(_data.EMBEDDED_QA)
  say = print if jax.process_index() == 0 else (lambda sentence: None)
  load = lambda p: _data.load_rows(p, tokenizer, cfg.data.seq_len, cfg.data.format, cfg.data.text_field,
                                   cfg.data.packing, cfg.data.truncation, say)
  rows = load(path)
  if cfg.data.eval_path:
    return rows, load(cfg.data.eval_path)
  return _data.split_rows(rows, cfg.data.eval_fraction, cfg.data.seed)


def train(cfg: TrainConfig = TrainConfig(), *, model: nnx.Module | None = None, tokenizer=None) -> TrainResult:
  """Run (or resume) the training job ``cfg``; returns a ``TrainResult``.

  ``model`` / ``tokenizer`` override ``cfg.model`` / ``cfg.data.tokenizer``
  with objects built in code (a model without adapters).
  Raises LaunchError, ConfigError, OutputDirError, DataError, MeshError or ValueError on
  bad input before any compute, NonFiniteLossError if the loss diverges, and
  TrainingInterrupted after SIGINT/SIGTERM, once the current step is checkpointed.
  """
  if not isinstance(cfg, TrainConfig):
    raise TypeError(f"train() takes a jlora.TrainConfig, got {type(cfg).__name__}.")
  _sharding.initialize_distributed()
  enable_compile_cache(cfg.compile_cache)  # before the first compile
  out = Path(cfg.output_dir)
  config_dict = cfg.to_dict()
  decision = check_output_dir(out, config_dict, cfg.overwrite)
  check_report(cfg.report)
  check_attention(cfg.model.attention, for_backend=True)  # before any weights are read
  model_dir, remat, picked = None, "", ""
  given = model is not None  # a model built in code keeps its own scan_unroll
  if cfg.mesh.fsdp == -1:
    model, model_dir, mesh_shape, remat, picked = _auto_mesh(cfg, model)
  else:
    mesh_shape = _sharding.resolve_mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.batch_size)
  mesh = _sharding.make_mesh(mesh_shape)
  if model is None:
    model, model_dir = load_model(cfg.model, mesh)
  else:
    set_attention(model, cfg.model.attention)
  if remat and isinstance(model, LanguageModel):
    model.remat = remat
  tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer, model_dir)
  limit = max_length(model)
  if limit is not None and cfg.data.seq_len > limit:
    raise ValueError(f"data.seq_len={cfg.data.seq_len} is over the model's maximum of {limit} positions; "
                     f"set data.seq_len <= {limit}.")
  check_tokenizer_fits(tokenizer, model, "use the model's own tokenizer (data.tokenizer='').")
  vocab = vocab_size(model)
  train_rows, eval_rows = _prepare_data(cfg, tokenizer)
  if vocab is not None:
    _data.check_vocab(train_rows, vocab, cfg.data.path or "the demo corpus")
    _data.check_vocab(eval_rows, vocab, cfg.data.eval_path or cfg.data.path or "the demo corpus")
  if isinstance(model, LanguageModel):  # cuDNN's packed attention makes room for this many records per row
    model.max_segments = max(_data.segment_bound(r.segment_ids) for r in (train_rows, eval_rows))
  local = _sharding.process_rows(mesh, cfg.batch_size)  # this process's rows of every global batch
  stream = _data.BatchStream(train_rows, cfg.batch_size, cfg.data.seed, local=local)
  held_out = _data.eval_batches(eval_rows, cfg.batch_size, cfg.eval_batches) if len(eval_rows) else []

  add_adapter(model, cfg.adapter)
  set_lora_matmul(model, _lora_matmul(cfg.model.lora_matmul, mesh_shape), shared_input=False)
  if cfg.model.scan_unroll == "auto" and not given and isinstance(model, LanguageModel):
    r, targets = planned_adapter(cfg.adapter)
    model.scan_unroll = _memory_fit.job_scan_unroll(
        model, batch_size=cfg.batch_size, seq_len=cfg.data.seq_len, mesh=mesh_shape, remat=model.remat, r=r,
        targets=targets, capacity_gib=cfg.mesh.device_memory_gib, backend=jax.default_backend())
  _plan_memory(cfg, model, mesh_shape, picked)
  _distributed.barrier("jlora:checked-output-dir")  # every process decided before process 0 writes
  if jax.process_index() == 0:
    claim_output_dir(out, config_dict, decision)
  _distributed.barrier("jlora:claimed-output-dir")
  graphdef, params, rng, frozen = _steps.split_model(model)
  params, rng, frozen = (_sharding.shard_state(s, mesh) for s in (params, rng, frozen))
  o = cfg.optim
  tx = _steps.make_optimizer(
      model, params, learning_rate=o.learning_rate, steps=cfg.steps, warmup_steps=o.warmup_steps,
      end_lr_ratio=o.end_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, grad_clip=o.grad_clip,
      grad_accum=o.grad_accum, loraplus_lr_ratio=o.loraplus_lr_ratio,
      loraplus_lr_embedding=o.loraplus_lr_embedding)
  opt_state = _sharding.init_on_mesh(tx.init, params)  # committed to the mesh: the step compiles once

  ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save)
  start = ckpt.latest_step() if decision == "resume" else None
  if start is not None:
    (params, opt_state, rng), meta = ckpt.restore(start, (params, opt_state, rng))
    stream.restore(meta["data"])
  step = start or 0
  primary = jax.process_index() == 0  # writes the reports
  if start is not None and primary:
    print(f"jlora: resuming from step {start} of {cfg.steps} ({ckpt.directory / str(start)})", file=sys.stderr,
          flush=True)
  metrics = Metrics(out / "metrics.jsonl", step if start is not None else -1, write=primary,
                    sinks=open_sinks(cfg.report, out, config_dict, start) if primary else ())
  train_step = _steps.make_train_step(graphdef, tx, cfg.loss_chunk_tokens, mesh=mesh, stats=True)
  schedule = _steps.lr_schedule(o.learning_rate, cfg.steps, o.warmup_steps, o.end_lr_ratio)
  put = lambda rows: _sharding.put_batch(rows, mesh, cfg.batch_size)
  eval_step = _steps.make_eval_step(graphdef, cfg.loss_chunk_tokens, mesh=mesh)

  def evaluate():
    totals = [eval_step(params, rng, frozen, put({k: v[local] for k, v in b.items()})) for b in held_out]
    nll = sum(float(t) for t, _ in totals)
    count = sum(float(c) for _, c in totals)
    return nll / max(count, 1.0)

  progress = Progress(cfg.steps, step, cfg.progress and primary)
  stop = _StopSignals()
  try:
    stop.__enter__()
    if step == 0 and held_out:
      loss0 = evaluate()
      metrics.log({"step": 0, "eval_loss": loss0, "eval_ppl": math.exp(min(loss0, 50))})
    while step < cfg.steps:
      micro_losses, counts = [], []
      for _ in range(o.grad_accum):
        batch = put(next(stream))
        params, opt_state, rng, loss, stats = train_step(params, opt_state, rng, frozen, batch)
        micro_losses.append(loss)
        counts.append(stats)
      step += 1
      loss = float(np.mean([float(x) for x in micro_losses]))
      if not math.isfinite(loss):
        ckpt.wait()
        last = ckpt.latest_step()
        raise NonFiniteLossError(
            f"The training loss became {loss} at step {step}. The last good checkpoint is "
            f"{f'step {last}' if last is not None else 'none'} in {ckpt.directory} (kept). Lower "
            "optim.learning_rate or raise optim.warmup_steps, or check the data for bad records, "
            "and start again with a new output_dir (or overwrite=true).")
      tokens = sum(int(c["tokens"]) for c in counts)
      record = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),  # the rate this update used
                "grad_norm": float(np.mean([float(c["grad_norm"]) for c in counts])),  # mean over micro-batches
                "tokens": tokens, "trained_tokens": sum(int(c["trained_tokens"]) for c in counts)}
      eval_loss = None
      if held_out and (step % cfg.eval_every == 0 or step == cfg.steps):
        eval_loss = evaluate()
        record.update(eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
      rate = progress.update(loss, tokens, eval_loss)  # None on a run's first (compiling) step
      if rate is not None:
        record["tokens_per_s"] = rate
      metrics.log(record)
      if primary and not cfg.progress and (step % cfg.log_every == 0 or eval_loss is not None):
        progress.write(f"step {step}: loss {loss:.4f}" + (f", held-out {eval_loss:.4f}" if eval_loss else ""))
      stop.signum = _distributed.first_signal(stop.signum)  # all processes stop at the same step
      if step % cfg.checkpoint.every == 0 or step == cfg.steps or stop.signum is not None:
        ckpt.save(step, (params, opt_state, rng), {"step": step, "data": stream.state()})
      if stop.signum is not None and step < cfg.steps:
        ckpt.wait()
        raise TrainingInterrupted(
            f"{signal.Signals(stop.signum).name} at step {step}/{cfg.steps}: checkpoint saved in "
            f"{ckpt.directory}; run the same command (same output_dir) again to resume from step {step}.",
            stop.signum)
  finally:
    stop.__exit__()
    progress.close()
    metrics.close()
    ckpt.close()

  if jax.process_count() > 1:  # the adapter whole on every host, for process 0 to write
    params, rng = jax.tree.map(jnp.asarray, _distributed.gather_to_host((params, rng)))
  nnx.update(model, params, rng)
  return _finish(cfg, model, tokenizer, out, metrics.records, start, held_out)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _auto_mesh(cfg: TrainConfig, model: nnx.Module | None):
  """``mesh.fsdp=-1``: ``(model, model_dir, mesh shape, remat or "", sentence)`` the memory plan picks.

  A checkpoint's sizes come from its ``config.json`` (its weights are then
  loaded onto the picked mesh); a preset is built first (presets are small).
  """
  model_dir = None
  path = Path(cfg.model.name).expanduser()
  if model is None and (path / "config.json").is_file():
    sizes = _memory_fit.checkpoint_sizes(str(path / "config.json"), _DTYPE_BYTES[cfg.model.dtype])
  else:
    if model is None:
      model, model_dir = load_model(cfg.model)
    sizes = _memory_fit.model_sizes(model)
  m, remat, said = cfg.mesh, "", ""
  shape = (m.data, 1, m.tensor)
  r, targets = planned_adapter(cfg.adapter)
  if sizes is not None:
    shape, remat, said = _memory_fit.auto_mesh(
        sizes, devices=jax.device_count(), batch_size=cfg.batch_size, seq_len=cfg.data.seq_len, data=m.data,
        tensor=m.tensor, r=r, targets=targets, capacity_gib=m.device_memory_gib, backend=jax.default_backend(),
        scan_unroll=1 if cfg.model.scan_unroll == "auto" else cfg.model.scan_unroll)
  return model, model_dir, _sharding.resolve_mesh_shape(*shape, cfg.batch_size), remat, said


def _lora_matmul(mode: str, mesh_shape: tuple[int, int, int]) -> str:
  """``mode``, except ``"exact"`` under tensor parallelism, which computes the same sum as ``"plain"``:
  the stacked matmul pads and concatenates along the row-parallel kernels' split axis."""
  return "plain" if mode == "exact" and mesh_shape[2] > 1 else mode


def _plan_memory(cfg: TrainConfig, model: nnx.Module, mesh_shape: tuple[int, int, int], picked: str) -> None:
  """Print the per-device memory plan (and what ``mesh.fsdp=-1`` picked); refuse what won't fit."""
  ours = isinstance(model, LanguageModel)
  r, targets = planned_adapter(cfg.adapter)
  plan = _memory_fit.plan_job(
      model, devices=jax.device_count(), batch_size=cfg.batch_size, seq_len=cfg.data.seq_len, mesh=mesh_shape,
      remat=model.remat if ours else cfg.model.remat, r=r, targets=targets,
      capacity_gib=cfg.mesh.device_memory_gib, backend=jax.default_backend(),
      scan_unroll=model.scan_unroll if ours else 1)
  if plan is not None and jax.process_index() == 0:
    print(plan.describe() + (f"\n  {picked}" if picked else ""), flush=True)


def _finish(cfg, model, tokenizer, out: Path, history, start, held_out) -> TrainResult:
  """Write the adapter (and merged model), check reload and merge, plot, sample.

  Process 0 writes everything. The checks and samples run the model on
  process 0 alone, so they need the base whole there: in a multi-host job
  whose base was loaded sharded they are skipped, unless ``save_merged``
  (which needs the whole base anyway) gathers it to every host first.
  """
  primary = jax.process_index() == 0
  adapter_dir, merged_dir, checks = None, None, {}
  whole = _distributed.is_local(nnx.state(model))
  if not whole and cfg.save_merged:
    gather = lambda x: x if x.is_fully_addressable else jnp.asarray(_distributed.gather_to_host(x))
    nnx.update(model, jax.tree.map(gather, nnx.state(model, nnx.Param)))
    whole = _distributed.is_local(nnx.state(model))
  if not whole and primary and (held_out or cfg.samples):
    print("jlora: the base model is sharded over several processes; the reload/merge checks and samples "
          "are skipped (set save_merged=true to gather it to one host for them).")
  probe = held_out[0]["tokens"][:1] if held_out and whole else None
  if primary:
    adapter_dir, merged_dir, checks = export_adapter(model, out, probe, cfg.save_merged)
  plot = plot_losses(history, out / "loss_curve.png") if primary and history else None
  prompts, samples, base_samples = [], [], []
  if primary and cfg.samples and whole:
    prompts = sample_prompts(tokenizer, held_out, cfg.samples)
    sample = lambda: greedy_samples(model, tokenizer, prompts, max_new_tokens=min(32, cfg.data.seq_len // 2),
                                    seq_len=cfg.data.seq_len)
    with disable_adapters(model):
      base_samples = sample()
    samples = sample()
    write_samples(out / "samples.txt", prompts, base_samples, samples)
  eval_losses = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
  return TrainResult(model=model, output_dir=out, history=history, eval_losses=eval_losses,
                     resumed_from=start, adapter_dir=adapter_dir, merged_dir=merged_dir,
                     metrics_path=out / "metrics.jsonl", plot_path=plot, samples=samples, checks=checks,
                     sample_prompts=prompts, base_samples=base_samples)

