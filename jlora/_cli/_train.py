"""``jlora train [CONFIG.yaml] [--set key=value ...]``: run (or resume) a training job.

With no config file the default job runs: a LoRA on the shipped pretrained
base (``byte-stories``) learns the embedded corpus's Q/A records, and the
same prompts are answered before and after. ``--print-config`` shows the
resolved config as YAML and exits.
"""

from __future__ import annotations

import sys

import yaml

from jlora._cli._common import CliError, describe


def add_parser(sub) -> None:
  t = sub.add_parser("train", help="train an adapter (no config: the default demo job)",
                     description=describe(__doc__))
  t.add_argument("config", nargs="?", help="YAML file of TrainConfig fields (nested sections)")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override one field, e.g. --set optim.learning_rate=1e-3 (repeatable)")
  t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  t.set_defaults(run=run)


def run(args) -> int:
  from jlora.train import ConfigError, DataError, MeshError, OutputDirError, load_config

  try:
    cfg = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"jlora: config error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
  from jlora.train import TrainingInterrupted, train

  try:
    result = train(cfg)
  except (ConfigError, DataError, MeshError, OutputDirError, ValueError, FloatingPointError) as e:
    raise CliError(str(e)) from None
  except TrainingInterrupted as e:
    print(f"jlora: stopped by {e}", file=sys.stderr)
    return 128 + e.signum
  report(result)
  return 0


def report(result) -> None:
  """The end of a job: before/after answers, held-out loss of base vs adapter, where things went."""
  for prompt, before, after in zip(result.sample_prompts, result.base_samples, result.samples):
    print(f"prompt: {prompt!r}\n  base:    {before[len(prompt):]!r}\n  adapter: {after[len(prompt):]!r}")
  evals = result.eval_losses
  if evals:
    print(f"held-out loss: {evals[0][1]:.4f} (step {evals[0][0]}"
          f"{', the base' if evals[0][0] == 0 else ''}) -> {evals[-1][1]:.4f} (step {evals[-1][0]})")
  print(f"adapter saved to {result.adapter_dir}")
  for name, diff in result.checks.items():
    print(f"{name.replace('_', ' ')}: {diff:.2e}")
  print(f"metrics: {result.metrics_path}" + (f", loss curve: {result.plot_path}" if result.plot_path else ""))
