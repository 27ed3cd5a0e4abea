"""Argument types and option groups that several commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

from keel.core.artifact import cache_root


def positive_int(text: str) -> int:
    """argparse type for counts: a whole number >= 1, else a usage error naming the option."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def config_help(default: Path, example: str) -> str:
    return ("Configs are YAML (`extends: OTHER.yaml` inherits one); every key can be overridden with --set "
            f"KEY=VALUE (dotted paths, list items by index, values parsed as YAML), e.g. {example}. "
            f"The default config, {default}, documents every key.")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; repeatable. KEY+=VALUE appends to a list, e.g. "
                        "'train+={path: /abs/feedback/moderation.jsonl, feedback: true}'")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, default=cache_root() / "eval-cache.sqlite",
                        help="sqlite cache of scores, generations and likelihoods, keyed by model fingerprints "
                        f"(default: {cache_root() / 'eval-cache.sqlite'})")
    parser.add_argument("--no-cache", action="store_true", help="compute everything afresh and store nothing")
