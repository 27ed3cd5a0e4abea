"""The `keel` command line: train and evaluate models, serve them.

Each command group is a module of this package that adds its parsers with `set_defaults(func=...)`; `main` runs
the chosen function and turns any KeelError (a mistake the user can fix) into one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

import keel
from keel.cli import evaluate, export, feedback, serve, train
from keel.core.artifact import KeelError

COMMAND_GROUPS = (train, evaluate, export, serve, feedback)
KEEL_LOGGERS = ("keel",)  # every module logger is under keel.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="Keel: reward models, RLHF and reward scoring.")
    parser.add_argument("--version", action="version", version=f"keel {keel.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the INFO lines of the libraries Keel uses")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Keel's own progress at INFO; other libraries' INFO lines (ONNX Runtime's quantiser logs every tensor it
    # skips, accelerate every checkpoint file) only with --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in KEEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    cleanup = getattr(args, "cleanup", None)  # what a failed command leaves to tidy (train: OUTPUT.work)
    finish = getattr(args, "finish", None)  # what any run of the command ends with (train: the process group)
    try:
        status: int = args.func(args)
        return status
    except (KeelError, FileExistsError, FileNotFoundError) as error:
        if cleanup:
            cleanup(args)
        print(f"keel: error: {error}", file=sys.stderr)
        return 2
    except BaseException:
        if cleanup:
            cleanup(args)
        raise
    finally:
        if finish:
            finish(args)


if __name__ == "__main__":
    sys.exit(main())
