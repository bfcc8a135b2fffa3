"""``jlora merge BASE ADAPTER OUT``: fold a PEFT adapter into its base, write a plain HF checkpoint.

The result is ``config.json`` + ``model.safetensors`` that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads as the
adapted model (no peft needed). Weights are merged in float32 and written
in ``--dtype`` (default: the base checkpoint's dtype). Tokenizer files of
the base directory are copied alongside.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jlora._cli._common import (
    DTYPES, TOKENIZER_FILES, CliError, abstract_base, check_adapters, describe, load_base, refuse_non_empty)
from jlora.io import fresh_dir

EXTRA_FILES = TOKENIZER_FILES + ("special_tokens_map.json", "merges.txt", "generation_config.json")


def add_parser(sub) -> None:
  p = sub.add_parser("merge", help="merge a PEFT adapter into its base model (an HF checkpoint transformers loads)",
                     description=describe(__doc__))
  p.add_argument("base", metavar="BASE_DIR", help="base checkpoint directory, or a preset name (byte-stories)")
  p.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT adapter directory (adapter_config.json + "
                 "adapter_model.safetensors)")
  p.add_argument("out", metavar="OUT_DIR", help="new (or empty) directory for the merged checkpoint")
  p.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (default: the base's)")
  p.set_defaults(run=run)


def _base_dtype(base_dir: str | None) -> str:
  if base_dir is None:
    return "float32"
  raw = json.loads((Path(base_dir) / "config.json").read_text())
  dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
  return dtype if dtype in DTYPES else "float32"


def run(args) -> int:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jlora.io import load_peft, save_pretrained
  from jlora.quant import merge_and_unload

  out = Path(args.out).expanduser()
  refuse_non_empty(out, "OUT_DIR")
  check_adapters([args.adapter], abstract_base(args.base)[0])
  model, base_dir = load_base(args.base, "float32")
  try:
    load_peft(model, args.adapter)
  except ValueError as e:
    raise CliError(str(e)) from None
  merged = merge_and_unload(model)
  dtype = args.dtype or _base_dtype(base_dir)
  cast = jax.tree.map(lambda x: x.astype(getattr(jnp, dtype)), nnx.state(merged, nnx.Param))
  nnx.update(merged, cast)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = fresh_dir(out.parent, f".{out.name}.", ".tmp")
  try:  # written whole beside OUT_DIR, then renamed: never a half-written checkpoint
    save_pretrained(merged, tmp)
    for name in EXTRA_FILES if base_dir else ():
      if (Path(base_dir) / name).is_file():
        shutil.copyfile(Path(base_dir) / name, tmp / name)
    if out.is_dir():
      out.rmdir()
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"merged {args.adapter} into {args.base}: {out} ({dtype})")
  return 0
