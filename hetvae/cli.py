"""The ``hetvae`` command line.

Each sub-command is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and
``_run_<name>(args)`` does the work. ``main()`` wires them together.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# name -> (help text, add_arguments(parser), run(args) -> exit code); filled in below the command functions.
_COMMANDS: dict[str, tuple] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetvae",
        description="Heteroscedastic reconstruction likelihoods for image autoencoders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
