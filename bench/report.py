"""Render bench.py's JSONL results as the markdown tables of bench/RESULTS.md."""

from __future__ import annotations


def _gib(n: float) -> str:
  return f"{n / 2**30:.1f}"


def _row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def render(results: list[dict]) -> str:
  ok = [r for r in results if "error" not in r]
  failed = [r for r in results if "error" in r]
  out = []
  train = [r for r in ok if r["task"] == "train" and r.get("layers", 22) == 22 and r["batch"] > 1]
  if train:
    out += ["### Training step (TinyLlama-1.1B shape, bf16 base, LoRA r=16 on 7 projections, AdamW)", "",
            _row(["framework", "adapter", "batch", "tokens/s", "MFU (6N)", "MFU (4N)", "peak GiB",
                  "first step s"]),
            _row(["---"] * 8)]
    for r in sorted(train, key=lambda r: (r["batch"], r["adapter"], r["framework"])):
      out.append(_row([r["framework"], r["adapter"], f"{r['batch']}×{r['seq']}",
                       f"{r['tokens_per_s']:,.0f}", f"{r['mfu_6n']:.1%}",
                       f"{r['mfu_6n'] * 4 / 6:.1%}", _gib(r["peak_bytes"]),
                       f"{r['first_step_s']:.1f}"]))
    out.append("")
  forward = [r for r in ok if r["task"] == "forward"]
  if forward:
    out += ["### Forward pass (no grad): unmerged vs merged vs plain base", "",
            _row(["framework", "batch", "variant", "ms", "× base"]), _row(["---"] * 5)]
    for key in sorted({(r["framework"], r["batch"], r["seq"]) for r in forward}):
      group = [r for r in forward if (r["framework"], r["batch"], r["seq"]) == key]
      base = next((r for r in group if r["base_only"]), None)
      for r in group:
        variant = ("base" if r["base_only"] else "merged" if r["merged"] else
                   f"unmerged {r['adapter']}")
        ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        out.append(_row([r["framework"], f"{r['batch']}×{r['seq']}", variant,
                         f"{r['step_s'] * 1e3:.2f}", ratio]))
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
  for r in failed:
    out.append(f"- FAILED {r.get('framework')} {r.get('task')} batch {r.get('batch')}: "
               f"`{r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}`")
  return "\n".join(out)
