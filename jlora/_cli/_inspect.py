"""``jlora inspect ADAPTER_DIR``: what an adapter directory holds, read from its files alone (no model).

Shows the adapter type (LoRA, or MoSLoRA as the MoSLoRA authors' PEFT fork
writes it), the targeted modules, the ranks, ``lora_alpha``, the parameter
count and dtype, and whether stock PEFT and jlora can load it. jlora itself
writes MoSLoRA and WLoRA adapters as exact plain LoRA, which stock PEFT loads.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from jlora._cli._common import CliError, describe

FACTORS = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|"
                     r"lora_embedding_A|lora_embedding_B|lora_AB\.weight)$")
FORK_FIELDS = ("lora_use_mixer",)  # config fields of the MoSLoRA fork that stock PEFT does not know


def add_parser(sub) -> None:
  p = sub.add_parser("inspect", help="show an adapter's type, targets, ranks, size and who can load it",
                     description=describe(__doc__))
  p.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT adapter directory")
  p.add_argument("--json", action="store_true", help="print the summary as JSON")
  p.set_defaults(run=run)


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
  """``name -> (shape, dtype)`` of every tensor in a safetensors file (checked for corruption as loading does)."""
  from jlora.io import describe_safetensors

  return describe_safetensors(path)


def summarize(directory: str | Path) -> dict:
  """The facts ``jlora inspect`` prints, as a dict."""
  from jlora.io import CONFIG_NAME, WEIGHTS_NAME, from_peft_dict, read_json

  path = Path(directory).expanduser()
  if not path.is_dir():
    raise CliError(f"{path} is not a directory; pass a PEFT adapter directory (adapter_config.json + "
                   "adapter_model.safetensors).")
  try:
    raw = read_json(path / CONFIG_NAME)
  except ValueError as e:
    raise CliError(str(e)) from None
  info: dict = {"directory": str(path), "peft_type": raw.get("peft_type", "LORA")}
  weights = path / WEIGHTS_NAME
  if weights.is_file():
    try:
      tensors = _header(weights)
    except ValueError as e:
      raise CliError(str(e)) from None
    info["weights"] = WEIGHTS_NAME
  elif (path / "adapter_model.bin").is_file():
    tensors = {}
    info["weights"] = "adapter_model.bin (pickled: run `jlora convert` to get adapter_model.safetensors)"
  else:
    raise CliError(f"{path} has no {WEIGHTS_NAME}; copy the adapter's weights next to {CONFIG_NAME}.")
  modules: dict[str, dict] = {}
  unknown = []
  for name, (shape, _) in tensors.items():
    m = FACTORS.match(name)
    if m is None:
      unknown.append(name)
      continue
    modules.setdefault(m["module"], {})[m["kind"]] = shape
  mixers = sorted(k for k, v in modules.items() if "lora_AB.weight" in v)
  fork_fields = [k for k in FORK_FIELDS if raw.get(k)]
  is_moslora = bool(mixers or fork_fields)
  info["type"] = ("MoSLoRA (the MoSLoRA authors' PEFT fork format)" if is_moslora
                  else "LoRA" if info["peft_type"] == "LORA" else info["peft_type"])
  info["target_modules"] = raw.get("target_modules")
  leaves = Counter(k.rsplit(".", 1)[-1] for k in modules)
  info["adapted_modules"] = len(modules)
  info["modules_by_name"] = dict(sorted(leaves.items()))
  # rank = the leading axis of A ([r, in] for Linear, [r, num] for Embedding)
  ranks = Counter((v.get("lora_A.weight") or v.get("lora_embedding_A") or (0,))[0] for v in modules.values())
  info["r"] = raw.get("r")
  info["ranks"] = {int(r): n for r, n in sorted(ranks.items())}
  info["lora_alpha"] = raw.get("lora_alpha")
  info["use_rslora"] = bool(raw.get("use_rslora"))
  info["parameters"] = sum(_numel(s) for s, _ in tensors.values())
  info["dtypes"] = sorted({d for _, d in tensors.values()})
  peft_problems = []
  if mixers:
    peft_problems.append(f"{len(mixers)} lora_AB mixer tensors (MoSLoRA) that stock PEFT drops, which "
                         "changes the outputs")
  if fork_fields:
    peft_problems.append(f"fork-only config field(s) {', '.join(fork_fields)}")
  if unknown:
    peft_problems.append(f"{len(unknown)} tensor(s) that are no LoRA factor, e.g. {unknown[0]}")
  info["stock_peft_loads"] = not peft_problems
  info["stock_peft_problems"] = peft_problems
  try:
    from_peft_dict(raw, path / CONFIG_NAME)
    info["jlora_loads"], info["jlora_problem"] = bool(tensors), None if tensors else "convert the .bin first"
  except ValueError as e:
    info["jlora_loads"], info["jlora_problem"] = False, str(e)
  return info


def _numel(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n


def render(info: dict) -> str:
  ranks = ", ".join(f"r={r} ×{n}" for r, n in info["ranks"].items()) or "unknown (no safetensors weights)"
  targets = info["target_modules"]
  if not isinstance(targets, str):
    targets = list(targets or [])
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    targets = (", ".join(targets) if len(targets) <= 8
               else f"{len(targets)} module names ending in {', '.join(leaves)}")
  by_name = ", ".join(f"{k} ×{n}" for k, n in info["modules_by_name"].items())
  lines = [
      f"adapter:     {info['directory']}",
      f"type:        {info['type']}",
      f"weights:     {info['weights']}",
      f"targets:     {targets}",
      f"adapted:     {info['adapted_modules']} modules ({by_name})",
      f"ranks:       {ranks} (config r={info['r']})",
      f"lora_alpha:  {info['lora_alpha']}" + (" (rsLoRA scaling)" if info["use_rslora"] else ""),
      f"parameters:  {info['parameters']:,} ({', '.join(info['dtypes']) or 'n/a'})",
  ]
  if info["stock_peft_loads"]:
    lines.append("stock PEFT:  loads it (peft.PeftModel.from_pretrained)")
  else:
    lines.append("stock PEFT:  cannot load it as is: " + "; ".join(info["stock_peft_problems"]) +
                 ". jlora loads it and `jlora.save_peft` writes it back as plain LoRA (exact).")
  lines.append("jlora:       " + ("loads it (jlora.load_peft)" if info["jlora_loads"]
                                  else f"cannot load it: {info['jlora_problem']}"))
  return "\n".join(lines)


def run(args) -> int:
  info = summarize(args.adapter)
  print(json.dumps(info, indent=2) if args.json else render(info))
  return 0
