"""Where a jlora training step spends its GPU time: a trace, the optimized HLO and a kernel summary.

    python bench/profile_step.py --ckpt /dev/shm/tinyllama-22 --batch 8 --out $OUT

Writes ``step.hlo.txt`` (optimized HLO of the step), ``memory.txt`` (XLA's
memory analysis) and ``kernels.txt`` (GPU time per HLO op over the traced
steps, most first), and prints the kernel table's top.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def kernel_table(trace_path: str, steps: int) -> list[tuple[float, int, str, str]]:
  """``(ms per step, calls per step, op name, long name)`` for every op on a GPU stream."""
  with gzip.open(trace_path, "rt") as f:
    events = json.load(f)["traceEvents"]
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in str(e.get("args", {}).get("name", ""))}
  total, calls, long_names = collections.Counter(), collections.Counter(), {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids:
      args = e.get("args", {})
      name = args.get("hlo_op", e["name"])
      total[name] += e.get("dur", 0)
      calls[name] += 1
      long_names.setdefault(name, str(args.get("long_name", e["name"]))[:160])
  return sorted(((total[n] / 1e3 / steps, calls[n] // steps, n, long_names[n]) for n in total), reverse=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--adapter", default="lora")
  parser.add_argument("--remat", default="matmuls")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=".")
  args = parser.parse_args()
  bench.make_checkpoint(args.ckpt, bench.TINYLLAMA_LAYERS)
  bench._import_jax()
  import jax
  import jax.numpy as jnp

  model = bench._jlora_model(args, args.adapter)
  train_step, carry, frozen = bench._jlora_train_step(model)
  ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, bench.TINYLLAMA["vocab_size"])
  batch = dict(tokens=ids, attention_mask=jnp.ones_like(ids), loss_mask=jnp.ones_like(ids))
  compiled = train_step.lower(*carry, frozen, batch).compile()
  with open(os.path.join(args.out, "step.hlo.txt"), "w") as f:
    f.write(compiled.as_text())
  with open(os.path.join(args.out, "memory.txt"), "w") as f:
    f.write(str(compiled.memory_analysis()))
  print(compiled.memory_analysis())

  def step():
    carry[0], carry[1], carry[2], loss, _ = train_step(carry[0], carry[1], carry[2], frozen, batch)
    return loss

  for _ in range(args.warmup):
    jax.block_until_ready(step())
  trace_dir = os.path.join("/tmp", "jlora-trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      jax.block_until_ready(step())
  trace = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
  table = kernel_table(trace, args.steps)
  lines = [f"{ms:9.3f} ms {n:5d}x  {name:40s} {long}" for ms, n, name, long in table]
  total = sum(ms for ms, *_ in table)
  header = f"GPU busy {total:.1f} ms per step (batch {args.batch}x{args.seq})"
  with open(os.path.join(args.out, "kernels.txt"), "w") as f:
    f.write(header + "\n" + "\n".join(lines) + "\n")
  print(header)
  print("\n".join(lines[:45]))


if __name__ == "__main__":
  main()
