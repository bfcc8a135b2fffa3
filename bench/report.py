"""Render bench.py's JSONL results as the markdown tables of bench/RESULTS.md."""

from __future__ import annotations


def _gib(n: float) -> str:
  return f"{n / 2**30:.1f}"


def _row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def render(results: list[dict]) -> str:
  quant = [r for r in results if r.get("suite") == "quant"]  # bench/quant_suite.py rows: its own table
  results = [r for r in results if r.get("suite") != "quant"]
  ok = [r for r in results if "error" not in r]
  failed = [r for r in results if "error" in r]
  out = []
  train = [r for r in ok if r["task"] == "train" and r["batch"] > 1 and r.get("layers") in (22, 28)]
  if train:
    out += ["### Training step (bf16 base, LoRA r=16 on 7 projections, AdamW)", "",
            "MFU = (4·N_base + 3·F_attn + 6·N_adapter)·tokens/s / 989e12; 6N and 4N use N = all params. "
            "× PEFT+compile: same shape and batch.", "",
            _row(["shape", "framework", "adapter", "matmul", "shared", "remat", "unroll", "adapter dtype",
                  "attention", "batch", "tokens/s", "× PEFT+compile", "MFU", "MFU (6N)", "MFU (4N)", "peak GiB",
                  "first step s"]),
            _row(["---"] * 17)]
    compiled = {(r.get("shape", "tinyllama"), r["batch"], r["seq"]): r["tokens_per_s"] for r in train
                if r["framework"] == "peft-compile"}
    for r in sorted(train, key=lambda r: (r.get("shape", "tinyllama"), r["batch"], r["framework"],
                                          r["adapter"], r.get("lora_matmul", ""), r.get("attention", ""),
                                          r.get("scan_unroll", 1))):
      shape = r.get("shape", "tinyllama")
      ref = compiled.get((shape, r["batch"], r["seq"]))
      jl = r["framework"] == "jlora"
      out.append(_row([shape, r["framework"], r["adapter"], r.get("lora_matmul", "-") if jl else "-",
                       ("yes" if r.get("shared") else "no") if jl else "-", r["remat"] if jl else "-",
                       r.get("scan_unroll", 1) if jl else "-",
                       r.get("adapter_dtype", "-") if jl else "-", r.get("attention", "auto") if jl else "sdpa",
                       f"{r['batch']}×{r['seq']}",
                       f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / ref:.2f}" if ref else "-",
                       f"{r['mfu']:.1%}" if "mfu" in r else "-", f"{r['mfu_6n']:.1%}",
                       f"{r.get('mfu_4n', r['mfu_6n'] * 4 / 6):.1%}", _gib(r["peak_bytes"]),
                       f"{r['first_step_s']:.1f}"]))
    out.append("")
  forward = [r for r in ok if r["task"] == "forward"]
  if forward:
    out += ["### Forward pass (no grad): unmerged vs merged vs plain base", "",
            _row(["framework", "batch", "variant", "ms", "× base", "× merged"]), _row(["---"] * 6)]
    for key in sorted({(r["framework"], r["batch"], r["seq"]) for r in forward}):
      group = [r for r in forward if (r["framework"], r["batch"], r["seq"]) == key]
      base = next((r for r in group if r["base_only"]), None)
      merged = next((r for r in group if r["merged"]), None)
      for r in group:
        variant = r.get("variant") or ("base" if r["base_only"] else "merged" if r["merged"] else
                                       f"unmerged {r['adapter']}")
        ratio = lambda ref: f"{r['step_s'] / ref['step_s']:.2f}" if ref else "-"
        out.append(_row([r["framework"], f"{r['batch']}×{r['seq']}", variant,
                         f"{r['step_s'] * 1e3:.2f}", ratio(base), ratio(merged)]))
    out.append("")
  mixed = [r for r in ok if r["task"] == "mixed"]
  if mixed:
    out += ["### Mixed-adapter batch (a different adapter per row) vs one adapter, forward", "",
            _row(["batch", "variant", "ms", "tokens/s", "× single adapter (plain)"]), _row(["---"] * 5)]
    single = next((r for r in mixed if r.get("variant") == "single adapter (plain)"), None)
    for r in mixed:
      ratio = f"{single['step_s'] / r['step_s']:.2f}" if single else "-"
      out.append(_row([f"{r['batch']}×{r['seq']}", r.get("variant", "?"), f"{r['step_s'] * 1e3:.2f}",
                       f"{r['tokens_per_s']:,.0f}", ratio]))
    out.append("")
  kernels = [r for r in ok if r["task"] == "attention"]
  if kernels:
    out += ["### Attention kernels alone: forward + backward of one layer (bf16)", "",
            "max |Δ|: largest difference from cuDNN's output / dq on the same inputs.", "",
            _row(["shape", "batch", "kernel", "rows", "ms", "speed vs cuDNN", "max |Δ| out", "max |Δ| dq"]),
            _row(["---"] * 8)]
    for r in kernels:
      ref = next((o for o in kernels if o["shape"] == r["shape"] and o["attention"] == "cudnn"
                  and o["packed"] == r["packed"]), None)
      diff = lambda key: f"{r[key]:.3g}" if key in r else "-"
      out.append(_row([r["shape"], f"{r['batch']}×{r['seq']}", r["attention"], "packed" if r["packed"] else "full",
                       f"{r['step_s'] * 1e3:.2f}", f"{ref['step_s'] / r['step_s']:.2f}" if ref else "-",
                       diff("max_abs_diff_out"), diff("max_abs_diff_dq")]))
    out.append("")
  depth = [r for r in ok if r["task"] == "train" and r["batch"] == 1]
  if depth:
    out += ["### Compile time vs depth (jlora, first train step incl. compile)", "",
            _row(["layers", "first step s"]), _row(["---"] * 2)]
    for r in sorted(depth, key=lambda r: r["layers"]):
      out.append(_row([r["layers"], f"{r['first_step_s']:.1f}"]))
    out.append("")
  scaling = [r for r in ok if r["task"] == "scaling"]
  if scaling:
    out += ["### Multi-GPU scaling (jlora; same rows per data-parallel GPU; plan = jlora's memory plan)", "",
            _row(["model", "GPUs", "mesh", "global batch", "tokens/s", "weak-scaling efficiency",
                  "peak GiB/GPU", "plan GiB/GPU"]), _row(["---"] * 8)]
    for r in sorted(scaling, key=lambda r: (r.get("model", "tinyllama"), r["devices"], str(r.get("mesh")))):
      one = next((o for o in scaling if o["devices"] == 1 and o.get("model") == r.get("model")
                  and o.get("rows") == r.get("rows") and o["seq"] == r["seq"]), None)
      eff = "-" if one is None or r["devices"] == 1 else f"{r['tokens_per_s'] / (one['tokens_per_s'] * r['devices']):.1%}"
      mesh = r.get("mesh", {})
      mesh_text = ", ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) if isinstance(mesh, dict) else mesh
      plan = _gib(r["plan_bytes"]) if r.get("plan_bytes") else "-"
      out.append(_row([r.get("model", "tinyllama"), r["devices"], mesh_text or "1 GPU", f"{r['batch']}×{r['seq']}",
                       f"{r['tokens_per_s']:,.0f}", eff, _gib(r["peak_bytes"]), plan]))
    out.append("")
  if quant:
    from quant_suite import table
    out += ["### Quantized frozen base (LoRA r=16 on 7 projections; rows as QUANT_BASES names them)", "",
            table(quant), ""]
  for r in failed:
    out.append(f"- FAILED {r.get('framework')} {r.get('task')} {r.get('variant', '')} batch {r.get('batch')}: "
               f"`{r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}`")
  return "\n".join(out)
