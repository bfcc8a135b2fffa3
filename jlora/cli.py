"""The ``jlora`` command: ``train``, ``merge``, ``generate``, ``inspect``, ``convert``.

``jlora COMMAND --help`` describes each; the implementations live in
``jlora._cli`` (one module per command). A bad argument or input file
prints one line naming the fix and exits 1 (a bad config exits 2).
"""

from __future__ import annotations

import argparse
import sys

from jlora._cli import CliError, _convert, _generate, _inspect, _merge, _train

COMMANDS = (_train, _merge, _generate, _inspect, _convert)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning the JAX way.")
  sub = parser.add_subparsers(dest="command", required=True)
  for command in COMMANDS:
    command.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return args.run(args)
  except CliError as e:
    print(f"jlora: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # Ctrl-C outside a training loop (which checkpoints and says how to resume)
    print(f"jlora: interrupted by SIGINT; {args.command} stopped before it finished (its files are written whole "
          "or not at all).", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
