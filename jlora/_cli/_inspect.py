"""``jlora inspect ADAPTER_DIR``: what an adapter directory holds, read from its files alone (no model).

Shows the adapter type (the registered kind that reads it: LoRA, DoRA, VeRA,
or MoSLoRA as the MoSLoRA authors' PEFT fork writes it), the targeted modules,
the ranks, ``lora_alpha``, the parameter count and dtype, and whether stock
PEFT and jlora can load it. Both verdicts come from the checks ``load_peft``
runs on the files (``read_adapter``) and the kind's PEFT format.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from jlora._cli._common import CliError, describe

FACTORS = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|"
                     r"lora_embedding_A|lora_embedding_B|lora_AB\.weight)$")


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
  from jlora.io import CONFIG_NAME, WEIGHTS_NAME, read_json

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
  for name, (shape, _) in tensors.items():
    m = FACTORS.match(name)
    if m is not None:
      modules.setdefault(m["module"], {})[m["kind"]] = shape
  kind, config_problem = _kind(raw, path / CONFIG_NAME)
  info["type"] = _type_name(kind, info["peft_type"])
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
  info.update(_verdicts(path, kind, config_problem, tensors, info["peft_type"]))
  return info


def _kind(raw: dict, config_file: Path):
  """``(kind, None)`` of the registered kind that reads this config, else ``(None, why not)``."""
  from jlora.io import from_peft_dict
  from jlora.nn import kind_for_config

  try:
    return kind_for_config(from_peft_dict(raw, config_file)), None
  except ValueError as e:
    return None, str(e)


def _type_name(kind, peft_type: str) -> str:
  if kind is None:
    return peft_type
  if not kind.peft.stock_peft:
    return f"{kind.name} (the {kind.name} authors' PEFT fork format)"
  return kind.name


def _verdicts(path: Path, kind, config_problem: str | None, tensors: dict, peft_type: str) -> dict:
  """Who loads the adapter, from the validation ``load_peft`` runs (``read_adapter``) and the kind's
  PEFT format: stock PEFT loads what jlora reads in a stock format; a config jlora has no kind for
  is not judged for PEFT, unless its tensors are another type's (then neither loads it)."""
  from jlora.io import LORA_FACTOR_SUFFIXES, read_adapter

  if not tensors:
    problem = config_problem or "convert the .bin first (`jlora convert`)"
    return {"jlora_loads": False, "jlora_problem": problem, "stock_peft_loads": None,
            "stock_peft_problems": ["not judged: no safetensors weights"]}
  if kind is None:
    lora_keys = sorted(k for k in tensors if any(k.endswith("." + s) for s in LORA_FACTOR_SUFFIXES))
    if lora_keys:
      why = f"peft_type {peft_type!r} but LoRA factors such as {lora_keys[0]}: the config does not match the weights"
      return {"jlora_loads": False, "jlora_problem": config_problem, "stock_peft_loads": False,
              "stock_peft_problems": [why]}
    return {"jlora_loads": False, "jlora_problem": config_problem, "stock_peft_loads": None,
            "stock_peft_problems": [f"not judged: jlora has no kind for peft_type {peft_type!r}"]}
  try:
    read_adapter(path)
  except ValueError as e:
    return {"jlora_loads": False, "jlora_problem": str(e), "stock_peft_loads": False,
            "stock_peft_problems": [str(e)]}
  problems = []
  if not kind.peft.stock_peft:
    own = sorted(n for n in kind.peft.tensors.values() if n is not None and n not in LORA_FACTOR_SUFFIXES)
    problems.append(f"{kind.name} fork format: stock PEFT ignores its {', '.join(own)} tensors, which "
                    "changes the outputs")
  return {"jlora_loads": True, "jlora_problem": None, "stock_peft_loads": not problems,
          "stock_peft_problems": problems}


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
  elif info["stock_peft_loads"] is None:
    lines.append("stock PEFT:  " + "; ".join(info["stock_peft_problems"]))
  else:
    fix = (". jlora loads it and `jlora.save_peft` writes it in a format stock PEFT loads (exact)"
           if info["jlora_loads"] else "")
    lines.append("stock PEFT:  cannot load it as is: " + "; ".join(info["stock_peft_problems"]) + fix + ".")
  lines.append("jlora:       " + ("loads it (jlora.load_peft)" if info["jlora_loads"]
                                  else f"cannot load it: {info['jlora_problem']}"))
  return "\n".join(lines)


def run(args) -> int:
  info = summarize(args.adapter)
  print(json.dumps(info, indent=2) if args.json else render(info))
  return 0
