"""Where a jlora training step spends its device time: a trace, the optimized HLO and a breakdown.

    python bench/profile_step.py --shape tinyllama --batch 8 --lora-matmul auto --shared 0 --out $OUT

The model and step are bench.py's (same shapes, checkpoint, levers). Writes to
``--out``: ``step.hlo.txt`` (the optimized HLO), ``memory.txt`` (XLA's memory
analysis), ``kernels.txt`` (device time per HLO op over the traced steps, most
first) and ``summary.json`` (``--summary-json`` names another path): per-step
milliseconds and share of the step for each category

- ``gemm``: full-size matmuls (cuBLAS / cuBLASLt / CUTLASS / Triton gemm fusions);
- ``attention``: fused attention (cuDNN flash attention);
- ``low_rank``: matmuls with a side of at most ``LOW_RANK`` (an adapter's
  ``x @ A``, ``dy·Bᵀ``, ``xᵀ·dh`` and the ``A·B`` of an on-the-fly merge);
- ``elementwise``: other fusions (norms, rope, activations, adds, reductions);
- ``copy``: copies, dynamic-(update-)slices (a scan stacking its residuals), memcpy/memset;
- ``collective``: all-gather / all-reduce / reduce-scatter / NCCL;
- ``other``: the rest;

plus the GPU-idle remainder of the measured step, the count of cuBLAS GEMMs
whose epilogue adds a matrix (``beta`` = 1: the fused matmul's ``A·B + W``),
and the number of while loops. On CPU (smoke runs at ``--shape tiny``) the
trace has no GPU stream: host-side XLA op events are used when present, else
the categories are empty and the HLO facts still come out.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

LOW_RANK = 128
CATEGORIES = ("gemm", "attention", "low_rank", "elementwise", "copy", "collective", "other")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all", "send", "recv")
_SHAPE = re.compile(r"\b(?:bf16|f16|f32|f64|f8e4m3fn|f8e5m2|s4|s8|s16|s32|s64|u8|u32|pred)\[([\d,]*)\]")
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*[({]")


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """``({instruction name: its definition}, {computation name: its lines})`` of an HLO module's text."""
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    match = _DEFINITION.match(line)
    if match and " = " in line:
      instructions[match.group(1)] = match.group(2)
      if current is not None:
        computations[current].append(match.group(2))
    elif line.rstrip().endswith("{") and (comp := _COMPUTATION.match(line)):
      current = comp.group(1)
      computations[current] = []
  return instructions, computations


def _opcode(definition: str) -> str:
  """The opcode of ``definition`` (the text after ``name = ``), past its possibly tuple-shaped result."""
  rest = definition
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(" ", 1)[1] if " " in rest else ""
  match = re.match(r"\s*([a-z][\w\-]*)\(", rest)
  return match.group(1) if match else ""


def _dims(shape_text: str) -> list[int]:
  match = _SHAPE.search(shape_text)
  return [int(d) for d in match.group(1).split(",") if d] if match else []


def _operand_dims(definition: str, instructions: dict[str, str]) -> list[list[int]]:
  """Shapes of the first two operands of ``definition`` (the matmul's inputs).

  Taken from the operand list where the text prints them, else from the
  operands' own definitions.
  """
  opcode = _opcode(definition)
  args = (definition.split(opcode + "(", 1)[1] if opcode else "").split(")")[0]
  shapes = [[int(d) for d in m.group(1).split(",") if d] for m in _SHAPE.finditer(args)]
  if not shapes:
    names = [n.strip().lstrip("%") for n in args.split(",")]
    shapes = [_dims(instructions.get(n, "")) for n in names if n]
  return shapes[:2]


def _is_low_rank(dims: list[list[int]]) -> bool:
  sides = [d for shape in dims for d in shape[-2:] if d > 1]
  return bool(sides) and min(sides) <= LOW_RANK


def _matmul_dims(definition: str, instructions: dict[str, str],
                 computations: dict[str, list[str]]) -> list[list[int]] | None:
  """Operand shapes when ``definition`` is a matmul (a dot, a cuBLAS call or a gemm fusion), else None."""
  opcode = _opcode(definition)
  if opcode == "dot" or (opcode == "custom-call" and re.search(r"cublas|\$gemm|\$matmul", definition)):
    return _operand_dims(definition, instructions)
  if opcode == "fusion":
    called = re.search(r"calls=%?([\w.\-]+)", definition)
    body = computations.get(called.group(1), []) if called else []
    dots = [line for line in body if _opcode(line) == "dot"]
    if dots:
      return _operand_dims(dots[0], instructions)
    if re.search(r"triton_gemm|__triton|gemm_fusion|cutlass", definition):
      return []
  return None


def categorize(op: str, kernel: str, instructions: dict[str, str], computations: dict[str, list[str]]) -> str:
  """One of ``CATEGORIES`` for a device event of HLO op ``op`` running kernel ``kernel``."""
  definition = instructions.get(op, "")
  opcode = _opcode(definition) if definition else ""
  text = f"{op} {kernel}".lower()
  if any(opcode.startswith(c) for c in _COLLECTIVES) or "nccl" in text or "all-gather" in text \
     or "all-reduce" in text or "reduce-scatter" in text:
    return "collective"
  if re.search(r"fmha|flash|sdpa|dot_product_attention", text) or "cudnn$fmha" in definition:
    return "attention"
  dims = _matmul_dims(definition, instructions, computations) if definition else None
  if dims is None and re.search(r"gemm|cutlass|nvjet|xmma|cublas", text):
    dims = []
  if dims is not None:
    return "low_rank" if _is_low_rank(dims) else "gemm"
  if opcode in ("copy", "copy-start", "copy-done", "dynamic-update-slice", "dynamic-slice") \
     or re.search(r"dynamic.update.slice|dynamic.slice|memcpy|memset|^copy|\bcopy", text):
    return "copy"
  if opcode == "fusion" or "fusion" in text or text.startswith(("wrapped_", "loop_", "input_")):
    return "elementwise"
  return "other"


def epilogue_gemms(text: str) -> int:
  """cuBLAS GEMMs of an optimized GPU HLO module that add a matrix in their epilogue (``beta`` = 1)."""
  return len(re.findall(r"custom_call_target=\"__cublas\$(?:lt\$matmul|gemm)[^\n]*\"beta\":1(?:\.0)?\b", text))


def read_trace(path: str) -> list[dict]:
  with gzip.open(path, "rt") as f:
    return json.load(f)["traceEvents"]


def op_events(events: list[dict], instructions: dict[str, str]) -> tuple[str, list[dict]]:
  """``(where, events)``: complete events on the GPU streams, else host events of this module's HLO ops."""
  names = {e.get("pid"): str(e.get("args", {}).get("name", "")) for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in names.items() if "GPU" in name or "/device:" in name}
  complete = [e for e in events if e.get("ph") == "X"]
  if device:
    return "device", [e for e in complete if e.get("pid") in device]
  ops = [e for e in complete if e.get("args", {}).get("hlo_op") in instructions or e.get("name") in instructions]
  # A host event of a while / call encloses its body's events: count the body only.
  return "host", [e for e in ops if _opcode(instructions[e.get("args", {}).get("hlo_op") or e["name"]])
                  not in ("while", "call", "conditional")]


def kernel_table(events: list[dict], steps: int, instructions: dict[str, str],
                 computations: dict[str, list[str]]) -> list[tuple[float, int, str, str, str]]:
  """``(ms per step, calls per step, op name, kernel name, category)`` per HLO op, most time first."""
  total, calls, kernels = collections.Counter(), collections.Counter(), {}
  for e in events:
    args = e.get("args", {})
    op = str(args.get("hlo_op", e.get("name", "?")))
    total[op] += e.get("dur", 0)
    calls[op] += 1
    kernels.setdefault(op, str(args.get("long_name", e.get("name", "")))[:160])
  rows = [(total[op] / 1e3 / steps, calls[op] // steps, op, kernels[op],
           categorize(op, kernels[op], instructions, computations)) for op in total]
  return sorted(rows, reverse=True)


def breakdown(table, step_ms: float) -> dict:
  """Milliseconds per step, share of the step and calls per step for each category, and idle time."""
  out = {c: dict(ms=0.0, pct=0.0, calls=0) for c in CATEGORIES}
  for ms, n, _, _, category in table:
    out[category]["ms"] += ms
    out[category]["calls"] += n
  busy = sum(v["ms"] for v in out.values())
  for v in out.values():
    v["pct"] = 100 * v["ms"] / step_ms if step_ms else 0.0
  out["idle"] = dict(ms=max(step_ms - busy, 0.0), pct=100 * max(step_ms - busy, 0.0) / step_ms if step_ms else 0.0,
                     calls=0)
  return out


def format_breakdown(summary: dict) -> str:
  lines = [f"step {summary['step_ms']:.1f} ms wall, {summary['busy_ms']:.1f} ms busy ({summary['events']} events); "
           f"{summary['epilogue_gemms']} GEMMs with a matrix epilogue; {summary['while_loops']} while loops"]
  for name, v in summary["categories"].items():
    lines.append(f"  {name:12s} {v['ms']:9.2f} ms  {v['pct']:5.1f}%  {v['calls']:6d} calls")
  return "\n".join(lines)


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="tinyllama", choices=sorted(s for s in bench.SHAPES if s != "wide70b"))
  parser.add_argument("--layers", type=int, default=0, help="default: the shape's own depth")
  parser.add_argument("--ckpt", default="", help="default: /dev/shm/<shape>-<layers> (created if missing)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--adapter", default="lora")
  parser.add_argument("--lora-matmul", default="auto", choices=["auto", "fused", "plain"])
  parser.add_argument("--shared", type=int, default=0)
  parser.add_argument("--remat", default="matmuls")
  parser.add_argument("--scan-unroll", type=int, default=1)
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=3, help="steps traced")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=".")
  parser.add_argument("--summary-json", default="", help="default: <out>/summary.json")
  args = parser.parse_args(argv)
  args.layers = args.layers or bench.SHAPES[args.shape]["layers"]
  args.ckpt = args.ckpt or os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                                        f"{args.shape}-{args.layers}")
  return args


def main(argv=None) -> dict:
  args = _parse_args(argv)
  # Without command buffers every kernel is its own trace event, tied to its HLO op.
  if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
  os.makedirs(args.out, exist_ok=True)
  bench.make_checkpoint(args.ckpt, args.shape, args.layers)
  bench._import_jax()
  import jax
  import jax.numpy as jnp
  import numpy as np

  model = bench._jlora_model(args, args.adapter)
  train_step, carry, frozen = bench._jlora_train_step(model)
  ids = np.asarray(jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, bench._vocab(args)))
  batch = jax.tree.map(jnp.asarray, dict(tokens=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids)))
  start = time.perf_counter()
  compiled = train_step.lower(*carry, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  with open(os.path.join(args.out, "step.hlo.txt"), "w") as f:
    f.write(hlo)
  memory = compiled.memory_analysis()
  with open(os.path.join(args.out, "memory.txt"), "w") as f:
    f.write(str(memory))

  step = bench._step_fn(compiled, carry, frozen, batch)
  for _ in range(args.warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(max(args.steps, 1)):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  step_ms = 1e3 * statistics.median(times)
  trace_dir = tempfile.mkdtemp(prefix="jlora-trace-")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      jax.block_until_ready(step())
  traces = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  instructions, computations = parse_hlo(hlo)
  where, events = op_events(read_trace(traces[-1]), instructions) if traces else ("none", [])
  table = kernel_table(events, args.steps, instructions, computations)
  summary = dict(
      device=jax.devices()[0].device_kind, backend=jax.default_backend(), events_from=where, shape=args.shape,
      layers=args.layers, batch=args.batch, seq=args.seq, adapter=args.adapter, lora_matmul=args.lora_matmul,
      shared=bool(args.shared), remat=args.remat, scan_unroll=args.scan_unroll, attention=args.attention,
      adapter_dtype=args.adapter_dtype,
      compile_s=round(compile_s, 2), step_ms=round(step_ms, 3), tokens_per_s=round(args.batch * args.seq / step_ms * 1e3),
      busy_ms=round(sum(row[0] for row in table), 3), events=len(events),
      epilogue_gemms=epilogue_gemms(hlo), while_loops=len(re.findall(r"\bwhile\(", hlo)),
      temp_bytes=getattr(memory, "temp_size_in_bytes", None),
      categories={k: {"ms": round(v["ms"], 3), "pct": round(v["pct"], 2), "calls": v["calls"]}
                  for k, v in breakdown(table, step_ms).items()})
  lines = [f"{ms:9.3f} ms {n:5d}x  {category:11s} {op:40s} {kernel}" for ms, n, op, kernel, category in table]
  text = format_breakdown(summary)
  with open(os.path.join(args.out, "kernels.txt"), "w") as f:
    f.write(text + "\n\n" + "\n".join(lines) + "\n")
  with open(args.summary_json or os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(text)
  print("\n".join(lines[:40]))
  print("SUMMARY " + json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  main()
