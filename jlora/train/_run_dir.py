"""The output directory of a run: claim it, or resume in it, or refuse a different run's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RUN_FILE = "run.json"
# Everything a run writes in its output_dir (names, or glob patterns): all that overwrite=true removes.
OUTPUTS = (RUN_FILE, "checkpoints", "adapter", "merged", "metrics.jsonl", "loss_curve.png", "samples.txt",
           "events.out.tfevents.*", "tensorboard", "wandb",
           # temp names of interrupted writes
           RUN_FILE + ".tmp", "metrics.tmp", "loss_curve.tmp.png", "samples.txt.tmp", ".adapter.*.tmp",
           ".adapter.*.old")
# Keys that may change between a run and its resumption: they do not change the numbers.
_FREE_KEYS = {"output_dir", "overwrite", "progress", "samples", "save_merged", "log_every",
              "checkpoint.async_save", "report.tensorboard", "report.wandb", "report.wandb_project",
              "report.wandb_name", "compile_cache", "model.scan_unroll"}


class OutputDirError(ValueError):
  """The output directory holds something other than this run."""


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def run_identity(config: dict) -> dict:
  """The config keys that define a run's numbers (flat, dotted)."""
  return {k: v for k, v in _flat(config).items() if k not in _FREE_KEYS}


def check_output_dir(directory: str | Path, config: dict, overwrite: bool) -> str:
  """Validate ``directory`` for this run: ``"resume"``, ``"fresh"`` or ``"replace"``.

  ``"resume"``: it holds this run already. A different run there is an
  error unless ``overwrite`` (``"replace"``: ``claim_output_dir`` removes it);
  a non-empty directory that is no jlora run is always an error. Nothing is
  written or removed here, so later validation errors leave it intact.
  """
  directory = Path(directory)
  if directory.exists() and not directory.is_dir():
    raise OutputDirError(f"output_dir {str(directory)!r} is an existing file; set output_dir to a directory "
                         "path (a new one is created).")
  if not directory.exists() or not any(directory.iterdir()):
    return "fresh"
  run_file = directory / RUN_FILE
  if not run_file.is_file():
    raise OutputDirError(
        f"output_dir {str(directory)!r} is not empty and holds no jlora run ({RUN_FILE}); choose a new "
        "or empty directory.")
  try:
    previous = json.loads(run_file.read_text())
  except json.JSONDecodeError as e:
    raise OutputDirError(f"{run_file} is corrupt ({e}); remove the directory or choose another.") from e
  old, new = run_identity(previous.get("config", {})), run_identity(config)
  differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  if not differing:
    return "resume"
  if overwrite:
    return "replace"
  shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing[:4])
  raise OutputDirError(
      f"output_dir {str(directory)!r} already holds a different run ({shown}"
      f"{', …' if len(differing) > 4 else ''}); use a new output_dir, or set overwrite=true to replace it.")


def claim_output_dir(directory: str | Path, config: dict, decision: str = "fresh") -> None:
  """Write ``run.json`` (atomically) so later jobs recognise this run.

  ``"replace"`` first removes what the previous run wrote (``OUTPUTS``); files
  the user put in the directory stay.
  """
  directory = Path(directory)
  try:
    if decision == "replace":
      for pattern in OUTPUTS:
        for path in directory.glob(pattern):
          shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"config": config}, indent=2))
    os.replace(tmp, directory / RUN_FILE)
  except PermissionError as e:
    raise OutputDirError(f"Cannot write the run to output_dir {str(directory)!r}: permission denied on "
                         f"{e.filename!r}. Choose an output_dir you can write to, or make it writable "
                         "(e.g. chmod u+w).") from None
