"""``jlora convert ADAPTER``: a pickled ``adapter_model.bin`` to ``adapter_model.safetensors``.

The MoSLoRA authors' PEFT fork (and PEFT before safetensors) writes adapter
weights as a torch pickle. jlora never unpickles when it loads; this command
reads the file once with ``torch.load(weights_only=True)`` (which refuses
arbitrary Python objects) and writes the same tensors, same names, as
safetensors beside it (or into ``--out``), atomically. Needs torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jlora._cli._common import CliError, describe

BIN, SAFE, CONFIG = "adapter_model.bin", "adapter_model.safetensors", "adapter_config.json"
INSTALL_TORCH = ("jlora convert reads PyTorch pickles and needs torch, which is not installed; install "
                 "the CPU build with `pip install torch --index-url https://download.pytorch.org/whl/cpu` "
                 "(or load the adapter in PEFT and save_pretrained it, which writes safetensors).")


def add_parser(sub) -> None:
  p = sub.add_parser("convert", help="adapter_model.bin (torch pickle) -> adapter_model.safetensors",
                     description=describe(__doc__))
  p.add_argument("adapter", metavar="ADAPTER", help=f"adapter directory holding {BIN}, or the .bin file")
  p.add_argument("--out", metavar="DIR", help=f"write {SAFE} (and a copy of {CONFIG}) here instead")
  p.add_argument("--overwrite", action="store_true", help=f"replace an existing {SAFE}")
  p.set_defaults(run=run)


def _numpy(name: str, tensor):
  import ml_dtypes
  import numpy as np
  import torch

  if not isinstance(tensor, torch.Tensor):
    raise CliError(f"entry {name!r} of the .bin file is a {type(tensor).__name__}, not a tensor; the file "
                   "is no adapter state dict.")
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return tensor.numpy().copy()


def read_bin(path: Path) -> dict:
  """``name -> numpy array`` of a torch state-dict pickle, loaded with ``weights_only=True``."""
  try:
    import torch
  except ImportError:
    raise CliError(INSTALL_TORCH) from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
    raise CliError(f"{path} could not be read as a weights-only torch file ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt or holds more than "
                   "tensors. Re-save it with torch.save(state_dict).") from None
  if not isinstance(state, dict) or not state:
    raise CliError(f"{path} holds a {type(state).__name__}, not a dict of named tensors (a state dict).")
  return {str(k): _numpy(str(k), v) for k, v in state.items()}


def run(args) -> int:
  from jlora.io import write_safetensors

  src = Path(args.adapter).expanduser()
  source = src / BIN if src.is_dir() else src
  if not source.is_file():
    raise CliError(f"{source} does not exist; pass an adapter directory holding {BIN} or the .bin file.")
  out_dir = Path(args.out).expanduser() if args.out else source.parent
  target = out_dir / SAFE
  if target.exists() and not args.overwrite:
    raise CliError(f"{target} already exists; pass --overwrite to replace it, or --out DIR.")
  if out_dir.exists() and not out_dir.is_dir():
    raise CliError(f"--out {out_dir} is a file; pass a directory.")
  tensors = read_bin(source)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_safetensors(tensors, target)  # temp file, then rename
  config = source.parent / CONFIG
  if out_dir != source.parent and config.is_file() and not (out_dir / CONFIG).exists():
    tmp = out_dir / f".{CONFIG}.tmp"
    shutil.copyfile(config, tmp)
    os.replace(tmp, out_dir / CONFIG)
  print(f"wrote {target} ({len(tensors)} tensors); `jlora inspect {out_dir}` shows what it holds")
  return 0
