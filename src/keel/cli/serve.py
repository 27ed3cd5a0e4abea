"""`keel serve`: resolve the model (training the default one first if it is absent), then run the service.

This is the only place serving meets training: the service itself is handed a model directory. In a serving
install (keel-rlhf[serve], no torch) the default model cannot be trained here; the error says what to do.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from keel.core.bundled import default_model_dir
from keel.core.hardware import has_torch


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve", help="serve reward scoring and moderation over HTTP", allow_abbrev=False,
        description="Serve /v1/score, /v1/moderations, /v1/models, /healthz, /readyz and /metrics. Every option "
        "is also read from a KEEL_* environment variable (e.g. --max-items from KEEL_MAX_ITEMS); flags win. "
        "Without --model (--moderation-model), the default reward (moderation) model is used, trained first if "
        "it is absent; --moderation-model none serves no moderation. Secrets have no flag, "
        "which `ps` would show: API keys come from --api-keys-file or KEEL_API_KEYS, the upstream's key from "
        "KEEL_UPSTREAM_API_KEY.")
    add_settings_arguments(serve)
    serve.set_defaults(func=run_serve)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per service setting, with the setting's description; unset flags fall back to KEEL_* or defaults."""
    from keel.service.settings import Settings, is_env_only

    for name, field in Settings.model_fields.items():
        if is_env_only(field):
            continue  # secrets: never on a command line, where `ps` shows them
        flag = "--" + name.replace("_", "-")
        env = f"KEEL_{name.upper()}"
        # A default of None is described in the field's own text ("default: one per CPU core ...").
        default = "" if field.default_factory or field.default is None else f"; default: {field.default}"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.description} (env {env}{default})")
        else:
            choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
            parser.add_argument(flag, default=None, choices=choices, help=f"{field.description} (env {env}{default})")


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from keel.service.server import preflight, serve
    from keel.service.settings import Settings, SettingsError

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as error:  # checked before any model is loaded or trained
        for problem in error.errors():
            if not problem["loc"]:  # a rule between settings: its message names them
                print(f"keel serve: error: {problem['msg'].removeprefix('Value error, ')}", file=sys.stderr)
                continue
            name = str(problem["loc"][0])
            print(f"keel serve: error: --{name.replace('_', '-')} (or KEEL_{name.upper()}): {problem['msg']}",
                  file=sys.stderr)
        return 2
    if settings.log_format == "json":
        from keel.service.logs import log_as_json

        log_as_json()  # before the default model trains, so its logs are JSON too
    try:
        # Unset means the default model; "none" (already None in settings) means no moderation model.
        default_moderation = (args.moderation_model or os.environ.get("KEEL_MODERATION_MODEL")) is None
        preflight(settings)  # bad settings are reported before a default model trains, not after
        if settings.model is None:
            settings.model = default_model("reward", "--model")
        if default_moderation:
            settings.moderation_model = default_model("moderation", "--moderation-model")
        serve(settings)
    except SettingsError as error:  # other errors (a bad model directory) are `keel: error:` lines from main
        print(f"keel serve: error: {error}", file=sys.stderr)
        return 2
    return 0


def default_model(kind: str, flag: str) -> Path:
    """The default reward or moderation model: from the cache, trained there first if absent (where this
    install can train)."""
    directory = default_model_dir(kind)
    if not has_torch():
        if (directory / "keel.json").exists():
            return directory  # trained earlier, or by a training install sharing this cache
        from keel.service.settings import SettingsError

        raise SettingsError(f"no {flag} given, and the default {kind} model is not in the cache ({directory}); "
                            f"this install cannot train it (no torch): pass {flag} DIR, or train it once with "
                            f"pip install 'keel-rlhf[train]' and `keel serve`")
    from keel.training.default_models import ensure_default_model, ensure_default_moderation_model

    ensure = ensure_default_moderation_model if kind == "moderation" else ensure_default_model
    return ensure(directory)
