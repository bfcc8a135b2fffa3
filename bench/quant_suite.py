"""Quantized-base suite: LoRA training on bf16, nf4, int8 and fp8 bases, one GPU.

At TinyLlama's shape (22 layers, hidden 2048) and Llama-3.2-3B's (28 layers,
hidden 3072, 24/8 heads, ffn 8192, vocab 128256, tied embeddings), random
init, LoRA r=16 on the 7 projections, AdamW, causal-LM loss, ``remat=matmuls``.
Each (shape, base) runs in its own subprocess so peak memory does not mix; the
model is built the way ``from_pretrained(quantize=...)`` loads it (tensor by
tensor, each kernel quantized as soon as it exists), so the bf16 base is
never on the device next to the quantized one.

    python bench/bench.py run --suite quant --steps 5 --warmup 1 --out $OUT/quant.jsonl

Environment (all optional):

* ``QUANT_SHAPES``: ``tinyllama,llama3b`` (default) or one of them;
* ``QUANT_BASES``: rows to run, default ``bf16,nf4,int8,fp8``; a row is a base
  with options after a colon, joined by ``+``, compared side by side in one
  run, e.g. ``bf16,fp8,fp8:separate+unfused,fp8:unfused,fp8:head,fp8:autotune0``:
  ``separate`` (fp8: cast the input for each projection), ``unfused`` (fp8:
  LoRA adapters under plain autodiff; ``separate+unfused`` is the first
  fp8 implementation),
  ``upcast`` (fp8: input gradient GEMM in bf16), ``head`` (the untied
  ``lm_head`` quantized too), ``auto`` (``set_lora_matmul(model, "auto")``),
  ``autotune0`` (``XLA_FLAGS=--xla_gpu_autotune_level=0``: no GEMM autotuning,
  to see what compile time autotuning takes), ``autotune1`` (level 1:
  autotuning without the default level 4's buffer initialisation and
  result checks), ``cache`` (jlora's compile cache, ``jlora.train.enable_compile_cache``, in
  ``QUANT_CACHE_DIR``, default ``/tmp/jlora-compile-cache``: a second ``fp8:cache`` row of a shape is a
  second start, its ``compile_s`` the cached load);
* ``QUANT_BUDGET_S`` (default 540): the suite's wall time; runs start only
  while it lasts;
* ``QUANT_RUN_TIMEOUT_S`` (default 300): one run's wall time, compile included.

Reported per run: tokens/s, step time, compile time (``compile_s``) and the
first step after it (``first_step_s``), peak device memory, the frozen base's
bytes, bytes per quantized-kernel parameter (scales included), and
``fp8_gemms``: cuBLASLt fp8 GEMM calls in the compiled step (> 0 shows the fp8
base really runs fp8 matmuls on the GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROPE = (("rope_theta", 500000.0), ("rope_type", "default"))
SHAPES = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    "llama3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                    num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
BASES = ("bf16", "nf4", "int8", "fp8")
OPTIONS = ("separate", "unfused", "upcast", "head", "auto", "autotune0", "autotune1", "cache")
XLA_OPTION_FLAGS = {"autotune0": "--xla_gpu_autotune_level=0", "autotune1": "--xla_gpu_autotune_level=1"}


def parse_row(row: str) -> tuple[str, tuple[str, ...]]:
  """``"fp8:separate+head"`` -> ``("fp8", ("separate", "head"))``; raises on unknown names."""
  base, _, options = row.partition(":")
  options = tuple(o for o in options.split("+") if o)
  if base not in BASES or any(o not in OPTIONS for o in options):
    raise ValueError(f"QUANT_BASES row {row!r}: bases are {BASES}, options {OPTIONS}")
  if base != "fp8" and {"separate", "unfused", "upcast"} & set(options):
    raise ValueError(f"QUANT_BASES row {row!r}: separate, unfused and upcast are fp8 options")
  return base, options


def build(shape: str, base: str, head: bool = False):
  """A random-init bf16 Llama of ``shape``; Linear kernels quantized one by one as they are made
  (with ``head``, the untied ``lm_head`` as well)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jlora.models import CausalLM, ModelConfig
  from jlora.quant import LoadQuantizer

  config = ModelConfig(model_type="llama", max_position_embeddings=4096, norm_eps=1e-5, rope=ROPE,
                       **SHAPES[shape])
  abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                             rngs=nnx.Rngs(0)))
  targets = TARGETS + ["lm_head"] if head else None
  quantizer = None if base == "bf16" else LoadQuantizer(abstract, base, targets=targets)
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  normal = jax.jit(lambda key, shape: (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16),
                   static_argnums=1)
  for i, (path, variable) in enumerate(flat.items()):
    if "norm" in str(path[-2]):
      value = jnp.ones(variable.shape, variable.dtype)
    else:
      value = normal(jax.random.key(i), tuple(variable.shape))
    if quantizer is None or not quantizer.take(path, value):
      variable.set_value(value)
    del value
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return quantizer.finish(model) if quantizer is not None else model


def weight_bytes(model) -> dict:
  import numpy as np
  from flax import nnx
  from jlora.quant import QuantizedLinear, QuantizedWeight

  size = lambda state: sum(int(np.prod(v.shape)) * v.dtype.itemsize for _, v in nnx.to_flat_state(state))
  quantized = size(nnx.state(model, QuantizedWeight))
  params = sum(layer.in_features * layer.out_features * max(1, int(np.prod(layer.stack_shape)))
               for _, layer in nnx.iter_graph(model) if isinstance(layer, QuantizedLinear))
  return dict(base_bytes=size(nnx.state(model, nnx.Param)) + quantized,
              bytes_per_quantized_param=quantized / params if params else None)


def worker(shape: str, row: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  import jax_compat
  jax_compat.patch_hijax()
  import jax
  import jax.numpy as jnp
  import bench
  import jlora
  start_process = time.perf_counter()

  base, options = parse_row(row)
  cache = None
  if "cache" in options:
    from jlora.train import enable_compile_cache
    cache = str(enable_compile_cache(os.environ.get("QUANT_CACHE_DIR", "/tmp/jlora-compile-cache")))
  if "head" in options and SHAPES[shape]["tie_word_embeddings"]:
    raise ValueError(f"{row}: {shape} ties its output head to the embedding, which stays bf16 (no "
                     "quantized embedding); run head rows at tinyllama")
  model = build(shape, base, head="head" in options)
  sizes = weight_bytes(model)
  jlora.get_peft_model(model, jlora.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                               init_lora_weights=False))
  if "auto" in options:
    jlora.set_lora_matmul(model, "auto", shared_input=False)
  if base == "fp8":
    jlora.quant.set_fp8_matmul(model, shared_input="separate" not in options,
                               backward="upcast" if "upcast" in options else "fp8",
                               fused_lora="unfused" not in options)
  train_step, carry, frozen = bench._jlora_train_step(model)
  ids = jax.random.randint(jax.random.key(0), (batch, seq), 0, SHAPES[shape]["vocab_size"])
  inputs = dict(tokens=ids, attention_mask=jnp.ones_like(ids), loss_mask=jnp.ones_like(ids))

  start = time.perf_counter()
  compiled = train_step.lower(*carry, frozen, inputs).compile()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()

  step = bench._step_fn(compiled, carry, frozen, inputs)
  start = time.perf_counter()
  loss = float(step())
  first = time.perf_counter() - start
  to_first_step = time.perf_counter() - start_process  # model built, compiled (or loaded), one step
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  step_s = sorted(times)[len(times) // 2]
  stats = jax.devices()[0].memory_stats() or {}
  return dict(suite="quant", shape=shape, base=row, batch=batch, seq=seq, first_step_s=first, step_s=step_s,
              tokens_per_s=batch * seq / step_s, peak_bytes=stats.get("peak_bytes_in_use", 0),
              first_loss=loss, device=jax.devices()[0].device_kind, compile_s=compile_s,
              fp8_gemms=hlo.count("__cublas$lt$matmul$f8"), compile_cache=cache, to_first_step_s=to_first_step, **sizes)


def run(out: str, steps: int = 5, warmup: int = 1, timeout: float = 300.0, shapes=tuple(SHAPES),
        bases=BASES, batch: int = 4, seq: int = 2048, budget_s: float = 540.0) -> list[dict]:
  """Every (shape, base row) in its own subprocess; results appended to ``out`` (JSON lines).

  ``bases``: rows as ``QUANT_BASES`` names them (see the module doc). Runs
  start only while ``budget_s`` lasts (each gets at most ``timeout`` and the
  time left), so the whole suite fits one device call.
  """
  for row in bases:
    parse_row(row)
  results, start = [], time.perf_counter()
  for shape in shapes:
    for base in bases:
      left = budget_s - (time.perf_counter() - start)
      if left < 20:
        results.append(dict(suite="quant", shape=shape, base=base, error="skipped: time budget spent"))
        continue
      cmd = [sys.executable, __file__, shape, base, str(batch), str(seq), str(steps), str(warmup)]
      env = dict(os.environ)
      flags = [XLA_OPTION_FLAGS[o] for o in parse_row(base)[1] if o in XLA_OPTION_FLAGS]
      if flags:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "")] + flags).strip()
      print("#", " ".join(cmd[1:]), " ".join(flags), flush=True)
      started = time.perf_counter()
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(timeout, left), env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        result = (json.loads(lines[-1][len("RESULT "):]) if lines
                  else dict(suite="quant", shape=shape, base=base, error=(proc.stderr or proc.stdout)[-800:]))
      except subprocess.TimeoutExpired:
        result = dict(suite="quant", shape=shape, base=base, error=f"timed out after {min(timeout, left):.0f} s")
      result["wall_s"] = time.perf_counter() - started
      results.append(result)
      with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
      print(json.dumps(result), flush=True)
  print(table(results), flush=True)
  return results


def table(results: list[dict]) -> str:
  """Markdown: per shape, each base's tokens/s (and ratio to bf16), peak GiB, base GiB, bytes/param."""
  rows = ["| shape | base | tokens/s | × bf16 | peak GiB | base weights GiB | bytes/quantized param | fp8 GEMMs "
          "| compile s | first step s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for shape in dict.fromkeys(r["shape"] for r in results):
    ref = next((r for r in results if r["shape"] == shape and r["base"] == "bf16" and "error" not in r), None)
    for r in (r for r in results if r["shape"] == shape):
      if "error" in r:
        rows.append(f"| {shape} | {r['base']} | error: {r['error'][-120:]!r} | | | | | | | |")
        continue
      ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
      bpp = f"{r['bytes_per_quantized_param']:.3f}" if r.get("bytes_per_quantized_param") else "-"
      rows.append(f"| {shape} | {r['base']} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_bytes'] / 2**30:.1f} "
                  f"| {r['base_bytes'] / 2**30:.2f} | {bpp} | {r.get('fp8_gemms', '-')} "
                  f"| {r.get('compile_s', 0):.1f} | {r.get('first_step_s', 0):.2f} |")
  return "\n".join(rows)


if __name__ == "__main__":
  shape, base, batch, seq, steps, warmup = sys.argv[1:7]
  print("RESULT " + json.dumps(worker(shape, base, int(batch), int(seq), int(steps), int(warmup))), flush=True)
