"""`keel feedback`: the feedback store a `keel serve --feedback-db URL` fills, from the command line."""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from keel.cli.options import positive_int

if TYPE_CHECKING:
    from keel.service.feedback import FeedbackStore

DB_HELP = ("the feedback store: sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: $KEEL_FEEDBACK_DB, as "
           "keel serve reads it)")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    feedback = commands.add_parser("feedback", help="export, inspect and maintain the feedback store").add_subparsers(
        dest="what", required=True)

    def with_db(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--db", default=os.environ.get("KEEL_FEEDBACK_DB"), help=DB_HELP)
        return parser

    export = with_db(feedback.add_parser(
        "export", help="write the feedback as training data",
        description="Write preferences.jsonl (TRL's conversational preference format), ratings.jsonl and "
        "moderation.jsonl (the 13 categories as true/false/null by majority vote) with a frozen train/test split "
        "by item, and datasheet.json (counts, annotators, agreement, time range, model versions). The "
        "directory is written atomically."))
    export.add_argument("--out", type=Path, required=True, help="the directory to write")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.set_defaults(func=run_export)
    with_db(feedback.add_parser(
        "stats", help="counts, agreement between annotators, ties and gold accuracy",
        description="Print, as JSON: the store's counts, answers by kind and by annotator, Krippendorff's alpha "
        "per task and per moderation category, moderation labels left unresolved by a tied vote, and each "
        "annotator's accuracy on gold items (the figures GET /v1/feedback/stats and /metrics give)."
    )).set_defaults(func=run_stats)
    labels = with_db(feedback.add_parser(
        "import", help="add labels made elsewhere (CSV, JSONL or JSON) as one annotator's answers",
        description="Moderation rows: text, optional context, and any of the 13 categories as 1/0, true/false or "
        "yes/no (blank: not labelled). Rating rows: prompt, reply, rating (1-7). Preference rows: prompt, "
        "chosen, rejected. Every row is checked before anything is written (a bad one is named by file and "
        "line); importing the same file again adds nothing twice."))
    labels.add_argument("file", type=Path, help="the labels: .csv, .jsonl or .json (optionally .gz)")
    labels.add_argument("--task", required=True, choices=["moderation", "rating", "preference"],
                        help="what the rows label")
    labels.add_argument("--annotator", required=True, help="whose labels these are (their name in the store, "
                        "the export and the agreement figures)")
    labels.set_defaults(func=run_import)
    rescore = with_db(feedback.add_parser(
        "rescore", help="re-score recorded responses with a retrained model, for the labelling queue",
        description="The labelling queue picks the moderation results nearest a threshold, and the best-of-n "
        "pairs with the smallest reward margin, by the model that served them. After retraining on the feedback "
        "(and reloading the server), run this with the new model so that the queue's next picks are what the new "
        "model is unsure of, not what the old one was: a moderation model re-scores moderation responses, a "
        "reward model the candidates of chat completions. Only the queue's uncertainty changes; the recorded "
        "output, scores and model versions stay as served."))
    rescore.add_argument("--model", type=Path, required=True,
                         help="the retrained moderation or reward model directory (keel.json)")
    rescore.add_argument("--newest", type=positive_int, help="only the newest N recorded responses of the model's "
                         "kind (default: all; the queue looks at keel serve --feedback-queue-pool of them)")
    rescore.add_argument("--chat-reward-weights", type=reward_weights, default={},
                         help="head weights the candidates are ranked by, as keel serve takes them (e.g. "
                         "harmless=1,helpful=0.5; default: the primary head)")
    rescore.set_defaults(func=run_rescore)
    with_db(feedback.add_parser("migrate", help="create or upgrade the store's schema (keel serve does this "
                                "at start too)")).set_defaults(func=run_migrate)
    purge = with_db(feedback.add_parser("purge", help="delete recorded responses (and their feedback) older "
                                        "than --older-than-days"))
    purge.add_argument("--older-than-days", type=float, required=True, help="age in days")
    purge.set_defaults(func=run_purge)


def store_of(args: argparse.Namespace) -> FeedbackStore:
    from keel.service.feedback import FeedbackError, FeedbackStore

    if not args.db:
        raise FeedbackError("no feedback store: give --db URL or set KEEL_FEEDBACK_DB")
    return FeedbackStore(args.db)


def run_export(args: argparse.Namespace) -> int:
    from keel.service.feedback_export import export

    datasheet = export(store_of(args), args.out, args.overwrite)
    print(json.dumps(datasheet["counts"], indent=2))
    print(f"feedback exported to {args.out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from keel.service.feedback_quality import summarise

    print(json.dumps(summarise(store_of(args)), indent=2))
    return 0


def run_import(args: argparse.Namespace) -> int:
    from keel.core.moderation import CATEGORIES
    from keel.service.feedback_import import import_labels
    from keel.training.data import read_rows

    counts = import_labels(store_of(args), read_rows(args.file), args.task, args.annotator, CATEGORIES,
                           args.file.name)
    print(f"imported {counts['rows']} {args.task} labels by {args.annotator} ({counts['new_items']} new items)")
    return 0


def reward_weights(text: str) -> dict[str, float]:
    from keel.service.settings import number_pairs

    try:
        return number_pairs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_rescore(args: argparse.Namespace) -> int:
    from keel.core.artifact import read_model_manifest
    from keel.core.runtime import ModerationRuntime, RewardRuntime
    from keel.service.capture import rescore
    from keel.service.feedback import FeedbackError

    runtime = (ModerationRuntime(args.model) if read_model_manifest(args.model).kind == "moderation-model"
               else RewardRuntime(args.model))
    if args.chat_reward_weights and isinstance(runtime, ModerationRuntime):
        raise FeedbackError(f"--chat-reward-weights ranks a reward model's heads, and {args.model} is a moderation "
                            "model: leave it out, or give a reward model")
    unknown = sorted(set(args.chat_reward_weights) - set(runtime.heads))
    if unknown:
        raise FeedbackError(f"--chat-reward-weights names {unknown}, which {args.model} does not have; its heads "
                            f"are {runtime.heads}")
    count = rescore(store_of(args), runtime, args.newest, args.chat_reward_weights)
    what = "moderation responses" if isinstance(runtime, ModerationRuntime) else "chat completions"
    print(f"re-scored {count} recorded {what} with {args.model}")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    store_of(args)
    print("feedback store schema is current")
    return 0


def run_purge(args: argparse.Namespace) -> int:
    removed = store_of(args).purge(timedelta(days=args.older_than_days))
    print(f"purged {removed} recorded responses")
    return 0
