"""What a person sees of a run: metrics JSONL, a progress bar, a loss-curve PNG, samples."""

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

  def __init__(self, path: str | Path, resume_step: int = 0, write: bool = True):
    self.path = Path(path)
    self.records: list[dict] = []
    self._file = None
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

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class Progress:
  """A tqdm bar over optimizer steps showing loss and tokens/s (tqdm adds the ETA)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
    self._t0 = None
    self._tokens = 0

  def update(self, loss: float, tokens: int, eval_loss: float | None = None) -> float:
    """Advance one step; returns tokens/s since the first step (which includes compiling)."""
    if self._t0 is None:
      self._t0, rate = time.perf_counter(), 0.0
    else:
      self._tokens += tokens
      rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
    if self._bar is not None:
      post = {"loss": f"{loss:.4f}", "tok/s": f"{rate:,.0f}"}
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


def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, seq_len: int) -> list[str]:
  """Greedy continuations of ``prompts``: ``jlora.generate`` for ``jlora.models`` models, else a fixed-shape loop.

  The fallback recomputes the whole window per token (no KV cache): fine
  for the few short samples a run writes.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  model.eval()
  if hasattr(getattr(model, "config", None), "num_key_value_heads"):
    try:
      return _generate_cached(model, tokenizer, prompts, max_new_tokens)
    except (ValueError, TypeError) as e:  # keep the run's outputs; the loop below needs only the forward
      print(f"jlora.generate failed ({str(e).splitlines()[0]}); sampling without a KV cache.")
    finally:
      model.train()
    model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_token(state, ids, mask, last):
    logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)
    return jnp.argmax(logits[jnp.arange(ids.shape[0]), last], axis=-1)

  out = []
  for prompt in prompts:
    ids = tokenizer.encode(prompt)[-(seq_len - max_new_tokens):]
    new = []
    for _ in range(max_new_tokens):
      window = np.full((1, seq_len), tokenizer.pad_id, np.int32)
      window[0, :len(ids)] = ids
      mask = (np.arange(seq_len) < len(ids)).astype(np.int32)[None]
      token = int(next_token(state, window, mask, jnp.asarray([len(ids) - 1]))[0])
      if token == tokenizer.eos_id:
        break
      ids.append(token)
      new.append(token)
    out.append(prompt + tokenizer.decode(new))
  model.train()
  return out


def _generate_cached(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
  """Greedy samples with ``jlora.generate`` (KV cache), cut at EOS."""
  import jax.numpy as jnp

  from jlora.models import generate

  out = []
  for prompt in prompts:
    ids = tokenizer.encode(prompt)
    tokens = generate(model, jnp.asarray([ids]), max_new_tokens, eos_token_id=tokenizer.eos_id)
    new = [int(t) for t in np.asarray(tokens)[0, len(ids):]]
    out.append(prompt + tokenizer.decode(new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new))
  return out
