"""The ``jlora`` subcommands, one module each; ``jlora.cli`` assembles them.

Each module exposes ``add_parser(subparsers)`` (its ``--help``) and
``run(args) -> exit code``. ``CliError`` is a user mistake: ``jlora.cli``
prints its message (which names the fix) and exits 1, no traceback.
"""

from jlora._cli._common import CliError

__all__ = ["CliError"]
