"""``jlora`` command line: ``jlora train [CONFIG.yaml] [--set key=value ...]``.

With no config file the embedded demo runs (a tiny model on a shipped
corpus, a few minutes on a CPU). ``--print-config`` shows the resolved
config as YAML and exits.
"""

from __future__ import annotations

import argparse
import sys

import yaml


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning the JAX way.")
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train an adapter (no config: the embedded demo job)")
  t.add_argument("config", nargs="?", help="YAML file of TrainConfig fields (nested sections)")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override one field, e.g. --set optim.learning_rate=1e-3 (repeatable)")
  t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
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
    print(f"jlora: error: {e}", file=sys.stderr)
    return 1
  except TrainingInterrupted as e:
    print(f"jlora: stopped by {e}", file=sys.stderr)
    return 128 + e.signum
  evals = result.eval_losses
  if evals:
    print(f"held-out loss: {evals[0][1]:.4f} (step {evals[0][0]}) -> {evals[-1][1]:.4f} (step {evals[-1][0]})")
  print(f"adapter saved to {result.adapter_dir}")
  for name, diff in result.checks.items():
    print(f"{name.replace('_', ' ')}: {diff:.2e}")
  print(f"metrics: {result.metrics_path}" + (f", loss curve: {result.plot_path}" if result.plot_path else ""))
  for sample in result.samples:
    print(f"sample: {sample!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
