"""Packed rows on one GPU: what segment ids and the chunked loss cost, side by side in one call.

A TinyLlama-shaped Llama (random bf16 weights, LoRA r=16 on all 7 linear
projections), the jlora train step at ``--batch x --seq``, each variant in
its own subprocess (so peak memory does not mix):

- ``plain``: rows without segment ids (causal attention over the whole row);
- ``packed``: segment ids of records 100..900 tokens long, ``attention=auto``
  with the model's ``max_segments`` set from the rows as ``jlora.train`` does
  (cuDNN's packed layout on Hopper; ``--max-segments`` overrides the bound,
  and above 16 cuDNN takes the dense mask instead);
- ``packed-dense``: the same rows with no bound given, so cuDNN's flash
  attention takes a dense ``[B, 1, T, T]`` same-record mask as a bias;
- ``packed-xla``: the same rows on XLA's attention with a ``[B, 1, T, T]`` mask;
- ``packed-chunked``: ``packed`` with the loss head run 4096 tokens at a time;
- ``packed-tokamax``: ``packed`` on tokamax's Pallas flash attention (its wheel carried).

It first checks that cuDNN's (and tokamax's) packed attention equals XLA's on
one packed row. ``--variants`` picks some of the variants.

    bench/on_device.sh bench/packing.py --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
VARIANTS = {"plain": ("auto", False, 0), "packed": ("auto", True, 0), "packed-dense": ("cudnn", True, 0),
            "packed-xla": ("xla", True, 0), "packed-chunked": ("auto", True, 4096),
            "packed-tokamax": ("tokamax", True, 0)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model(attention: str, layers: int):
  import jax.numpy as jnp
  from flax import nnx

  import jlora
  from jlora.models import CausalLM, ModelConfig

  config = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
                       max_position_embeddings=4096, norm_eps=1e-5,
                       rope=(("rope_theta", 10000.0), ("rope_type", "default")))
  m = CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), attention=attention)
  jlora.get_peft_model(m, jlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
  return m


def batch(b: int, t: int, packed: bool) -> dict:
  import numpy as np

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 32000, (b, t)).astype(np.int32)
  segments = np.ones((b, t), np.int32)
  if packed:
    for row in segments:
      start, sid = 0, 1
      while start < t:
        n = int(rng.integers(100, 900))
        row[start:start + n] = sid
        start, sid = start + n, sid + 1
  out = dict(tokens=tokens, loss_mask=np.ones_like(tokens), attention_mask=np.ones_like(tokens))
  if packed:
    out["segment_ids"] = segments
  return out


def check_equals_xla(seq: int) -> dict:
  """Largest difference of each packed kernel's hidden states from XLA's on one packed row (or its error)."""
  import jax.numpy as jnp
  import numpy as np

  from jlora.train import segment_bound

  m = model("xla", 2)
  b = {k: jnp.asarray(v[:1]) for k, v in batch(1, seq, True).items()}
  hidden = lambda: np.asarray(m.hidden(b["tokens"], segment_ids=b["segment_ids"]), np.float32)
  reference, out = hidden(), {}
  bound = segment_bound(np.asarray(b["segment_ids"]))
  for name, impl, max_segments in (("cudnn_ragged", "cudnn", bound), ("cudnn_dense", "cudnn", None),
                                   ("tokamax", "tokamax", None)):
    m.attention, m.max_segments = impl, max_segments
    try:
      out[f"{name}_packed_vs_xla_max_abs_diff"] = float(np.max(np.abs(hidden() - reference)))
    except Exception as e:  # a kernel that does not lower here
      out[f"{name}_packed_vs_xla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  return out


def run(variant: str, args) -> dict:
  import jax
  import jax.numpy as jnp

  import bench
  from jlora.train import segment_bound

  attention, packed, chunk = VARIANTS[variant]
  m = model(attention, args.layers)
  rows = batch(args.batch, args.seq, packed)
  if packed and variant != "packed-dense":  # no bound given: cuDNN takes the dense mask
    m.max_segments = args.max_segments or segment_bound(rows["segment_ids"])
  step, carry, frozen = bench._jlora_train_step(m, loss_chunk_tokens=chunk)
  once = bench._step_fn(step, carry, frozen, jax.tree.map(jnp.asarray, rows))
  start = time.perf_counter()
  loss = float(once())
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(once())
    times.append(time.perf_counter() - start)
  step_s = sorted(times)[len(times) // 2]
  stats = jax.devices()[0].memory_stats() or {}
  return dict(variant=variant, batch=args.batch, seq=args.seq, max_segments=m.max_segments if packed else None,
              loss=loss, first_step_s=compile_s, step_s=step_s,
              tokens_per_s=args.batch * args.seq / step_s, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=22)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--variant", choices=list(VARIANTS) + ["check"],
                      help="run one variant in this process (\"check\": the kernels against XLA)")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
  parser.add_argument("--timeout", type=int, default=500)
  parser.add_argument("--max-segments", type=int, default=0,
                      help="packed: records per row cuDNN makes room for (0: from the rows, as jlora.train does)")
  args = parser.parse_args()
  import jax_compat

  jax_compat.patch_hijax()
  if args.variant:
    result = check_equals_xla(args.seq) if args.variant == "check" else run(args.variant, args)
    print("RESULT " + json.dumps(result), flush=True)
    return
  # Every part in a process of its own: this one never takes GPU memory the next part needs.
  for variant in ["check"] + args.variants.split(","):
    cmd = [sys.executable, __file__, "--variant", variant] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("batch", "seq", "layers", "steps", "max_segments")]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
      print(json.dumps({"variant": variant, "error": f"timed out after {args.timeout} s"}), flush=True)
      continue
    lines = [l[len("RESULT "):] for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    print(lines[0] if lines else json.dumps({"variant": variant, "error": proc.stderr[-1500:]}), flush=True)


if __name__ == "__main__":
  main()
