"""What a person sees of a run: metrics JSONL, TensorBoard and wandb logs, a progress bar, a loss curve, samples.

TensorBoard event files are written with ``tensorboardX``: it writes the
event protobufs itself (a small pure-Python package over protobuf), where
``clu``'s writers and ``tf.summary`` need TensorFlow and
``torch.utils.tensorboard`` needs torch, neither of which a JAX training job
should have to install. wandb is used when ``report.wandb`` is set (and it
must then be installed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np


class Metrics:
  """``metrics.jsonl``: one JSON object per logged step (``{"step", "loss", ...}``).

  On resume, lines past the restored step are dropped (rewritten through a
  temporary file), so the file always matches the checkpointed run.
  """

  def __init__(self, path: str | Path, resume_step: int = 0, write: bool = True, sinks=()):
    self.path = Path(path)
    self.records: list[dict] = []
    self._file = None
    self._sinks = list(sinks)  # each has log(record) and close(): TensorBoard, Wandb
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # a line cut short by a kill
        if record.get("step", 0) <= resume_step:
          self.records.append(record)
    if not write:  # another process of a multi-host job writes the file
      return
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
    os.replace(tmp, self.path)
    self._file = self.path.open("a")

  def log(self, record: dict) -> None:
    self.records.append(record)
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    for sink in self._sinks:
      sink.log(record)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    for sink in self._sinks:
      sink.close()


def _scalars(record: dict) -> dict[str, float]:
  return {k: float(v) for k, v in record.items()
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
  """Every numeric metric as a TensorBoard scalar under ``<output_dir>/tensorboard``.

  ``purge_step`` (a resumed run's first new step) makes TensorBoard drop the
  earlier attempt's events from that step on, like ``metrics.jsonl`` does.
  """

  def __init__(self, logdir: str | Path, purge_step: int | None = None):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=10)

  def log(self, record: dict) -> None:
    for key, value in _scalars(record).items():
      self._writer.add_scalar(key, value, global_step=int(record["step"]))

  def close(self) -> None:
    self._writer.close()


class Wandb:
  """Metrics to a Weights & Biases run (``wandb.init(project, name, config, dir)``).

  A resumed job starts a new wandb run whose steps continue from the checkpoint.
  """

  def __init__(self, project: str, name: str, config: dict, directory: str | Path):
    import wandb

    self._run = wandb.init(project=project, name=name or None, config=config, dir=str(directory))

  def log(self, record: dict) -> None:
    self._run.log(_scalars(record), step=int(record["step"]))

  def close(self) -> None:
    self._run.finish()


def check_report(report) -> None:
  """Fail before any compute when a requested logger is not installed (the message says what to install)."""
  import importlib.util

  needed = [("tensorboard", "tensorboardX", "tensorboardX"), ("wandb", "wandb", "wandb")]
  for field, module, package in needed:
    if getattr(report, field) and importlib.util.find_spec(module) is None:
      raise ValueError(f"report.{field}=true needs the {package} package, which is not installed; "
                       f"`pip install {package}`, or set report.{field}=false.")


def open_sinks(report, output_dir: Path, config: dict, resume_step: int | None) -> list:
  """The loggers ``report`` (a ``ReportConfig``) asks for, writing under ``output_dir``."""
  sinks = []
  if report.tensorboard:
    sinks.append(TensorBoard(output_dir / "tensorboard", None if resume_step is None else resume_step + 1))
  if report.wandb:
    sinks.append(Wandb(report.wandb_project, report.wandb_name, config, output_dir))
  return sinks


class Progress:
  """A tqdm bar over optimizer steps: loss, tokens/s and ETA from the real step time.

  The first step of a run (or of a resumed run) includes compiling, so the
  rate and the ETA are measured from its end: tokens/s over the steps since,
  ETA = remaining steps x mean step time since. ``clock`` is injectable.
  """

  def __init__(self, total: int, initial: int, enabled: bool, clock=time.perf_counter):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    self._clock = clock
    self._total = total
    self._step = initial
    self._t0 = None  # end of the first (compiling) step
    self._steps = 0
    self._tokens = 0
    self.eta: float | None = None  # seconds left; None until a step after the first has run

  def update(self, loss: float, tokens: int, eval_loss: float | None = None) -> float | None:
    """Advance one step; returns tokens/s since the first step ended (None on the first step: no rate yet)."""
    self._step += 1
    now = self._clock()
    rate = None
    if self._t0 is None:
      self._t0 = now
    else:
      self._steps += 1
      self._tokens += tokens
      elapsed = max(now - self._t0, 1e-9)
      rate = self._tokens / elapsed
      self.eta = eta = (self._total - self._step) * elapsed / self._steps
    if self._bar is not None:
      post = {"loss": f"{loss:.4f}"}
      if self._steps:
        post.update({"tok/s": f"{rate:,.0f}", "eta": _clock_time(eta)})
      if eval_loss is not None:
        post["eval"] = f"{eval_loss:.4f}"
      self._bar.set_postfix(post, refresh=False)
      self._bar.update(1)
    return rate

  def write(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _clock_time(seconds: float) -> str:
  minutes, sec = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes:02d}:{sec:02d}"


def plot_losses(records: list[dict], path: str | Path) -> Path:
  """Train and held-out loss against step, saved as a PNG (written to a temp file, then renamed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = Path(path)
  fig, ax = plt.subplots(figsize=(6, 4))
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  held = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if train:
    ax.plot(*zip(*train), label="train loss")
  if held:
    ax.plot(*zip(*held), marker="o", label="held-out loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.legend()
  ax.grid(alpha=0.3)
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.savefig(tmp, dpi=100, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)
  return path


def sample_prompts(tokenizer, held_out: list[dict], n: int) -> list[str]:
  """Up to ``n`` prompts from held-out batches: instruction prompts first, then openings of text records.

  A packed row holds records separated by EOS; the first one may have begun
  in the previous row, so it is skipped. An instruction record's prompt is
  its tokens before the first trained one (the part the loss mask hides);
  a text record gives its first 12 tokens. Rows of one long record give
  their first 12 tokens.
  """
  asked, opened, row_starts = [], [], []
  for batch in held_out:
    for row, loss, valid in zip(batch["tokens"], batch["loss_mask"], batch["attention_mask"]):
      ids = [int(t) for t, v in zip(row, valid) if v]
      cuts = [i for i, t in enumerate(ids) if t == tokenizer.eos_id]
      if len(ids) > 12 and tokenizer.eos_id not in ids[:12]:
        row_starts.append(tokenizer.decode(ids[:12]))  # only if no record starts anywhere
      for begin, end in zip(cuts, cuts[1:] + [len(ids)]):
        record, mask = ids[begin + 1:end], [int(m) for m in loss[begin + 1:end]]
        if 1 not in mask:
          continue
        first = mask.index(1)
        if first:
          asked.append(tokenizer.decode(record[:first]))
        elif len(record) > 12:
          opened.append(tokenizer.decode(record[:12]))
  prompts = list(dict.fromkeys(asked + opened or row_starts))[:n]
  return prompts or ["Once upon a time"][:n]


def write_samples(path: Path, prompts: list[str], base: list[str], adapted: list[str]) -> None:
  """``samples.txt``: each prompt's continuation by the base model and by the adapted one."""
  blocks = [f"prompt: {p!r}\nbase:    {b[len(p):]!r}\nadapter: {a[len(p):]!r}" for p, b, a in zip(prompts, base, adapted)]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("\n\n".join(blocks) + "\n")
  os.replace(tmp, path)


def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, seq_len: int) -> list[str]:
  """Greedy continuations of ``prompts`` by ``jlora.models.generate``.

  A ``jlora.models`` model continues them as one batch through its KV cache;
  a model of your own (or a failed batch) continues each prompt alone
  without a cache, cut to fit ``seq_len`` with the new tokens.
  """
  from jlora.models import LanguageModel

  model.eval()
  try:
    if isinstance(model, LanguageModel):
      try:
        return [p + c for p, c in zip(prompts, continue_prompts(model, tokenizer, prompts, max_new_tokens))]
      except (ValueError, TypeError) as e:  # keep the run's outputs; one prompt at a time needs only the forward
        print(f"jlora.generate failed ({str(e).splitlines()[0]}); sampling one prompt at a time.")
    return [p + _continue_one(model, tokenizer, p, max_new_tokens, seq_len) for p in prompts]
  finally:
    model.train()


def _continue_one(model, tokenizer, prompt: str, max_new_tokens: int, seq_len: int) -> str:
  """The greedy continuation of one prompt (its last ``seq_len - max_new_tokens`` ids), cut at EOS."""
  import jax.numpy as jnp

  from jlora.models import generate

  ids = (list(getattr(tokenizer, "bos_ids", [])) + tokenizer.encode(prompt))[-(seq_len - max_new_tokens):]
  tokens = generate(model, jnp.asarray([ids], jnp.int32), max_new_tokens, eos_token_id=tokenizer.eos_id,
                    use_cache=False)
  return _decode_until_eos(tokenizer, np.asarray(tokens)[0, len(ids):])


def _decode_until_eos(tokenizer, row) -> str:
  new = [int(t) for t in row]
  return tokenizer.decode(new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new)


def continue_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> list[str]:
  """The text ``jlora.models.generate`` (KV cache) continues each prompt with, cut at EOS.

  The prompts go as one left-padded batch: one compile, whatever their lengths.
  """
  import jax.numpy as jnp

  from jlora.models import generate

  bos = list(getattr(tokenizer, "bos_ids", []))  # what training records start with
  encoded = [bos + tokenizer.encode(p) for p in prompts]
  width = max(len(ids) for ids in encoded)
  ids = np.full((len(encoded), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(encoded), width), np.int32)
  for row, e in enumerate(encoded):
    ids[row, width - len(e):], mask[row, width - len(e):] = e, 1
  tokens = generate(model, jnp.asarray(ids), max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    attention_mask=jnp.asarray(mask), eos_token_id=tokenizer.eos_id)
  return [_decode_until_eos(tokenizer, row) for row in np.asarray(tokens)[:, width:]]
