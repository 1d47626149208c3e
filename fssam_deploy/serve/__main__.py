"""`python -m fssam_deploy.serve serve|client ...`: the two subcommands without the rest of `fssam`."""

from __future__ import annotations

import argparse
import sys

from fssam_deploy.cli import add_model_flags, config_from_args
from fssam_deploy.errors import FSSAMError
from fssam_deploy.serve.cli import add_serve_parsers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fssam_deploy.serve")
    add_serve_parsers(parser.add_subparsers(dest="command", required=True), add_model_flags, config_from_args)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FSSAMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
