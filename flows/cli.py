"""The `nst` command: stylize (engine only), batch, serve, demo.

Prefect is imported only by the subcommands that need it, so `nst stylize` starts fast.
Exit codes: 0 ok, 1 a batch whose flow run failed, 2 bad input or parameters (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from nst_core.cli import add_stylize_parser, one_line
from nst_core.errors import NSTError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (subcommand parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nst", description="Batch neural style transfer (Gatys, VGG16) on Prefect.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_stylize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 with one line
    try:
        return args.handler(args)
    except (NSTError, ValidationError, ValueError) as err:
        print(f"nst: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nst: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
