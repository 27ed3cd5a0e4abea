"""A reward model's data: each head's examples by role (train, validation, test, moderation, guard), and the
provenance recorded in keel.json (paths and SHA-256), which re-export uses to find moved files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from keel.core.artifact import file_sha256
from keel.training.config import HEAD_ROLES
from keel.training.data import DataSource, Example, load_source, read_sources
from keel.training.reward.config import RewardConfig
from keel.training.reward.objectives import parse_example

log = logging.getLogger(__name__)


@dataclass
class HeadData:
    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    moderation: list[Example]
    guard: list[Example]


def read_examples(sources: list[DataSource], skip_bad_rows: bool, training: bool = False) -> list[Example]:
    """Every source's examples as a reward head reads them (pairs, ratings, labelled turns)."""
    return read_sources(sources, skip_bad_rows, training, partial(load_source, parse=parse_example))


def load_head_data(config: RewardConfig, skip_bad_rows: bool) -> list[HeadData]:
    return [HeadData(h.name, **{role: read_examples(getattr(h, role), skip_bad_rows, training=role == "train")
                                for role in HEAD_ROLES})
            for h in config.heads]


def data_provenance(config: RewardConfig) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for head in config.heads:
        for role, source in head.sources():
            entry = seen.setdefault(source.path, {"path": source.path, "sha256": file_sha256(source.path), "uses": []})
            entry["uses"].append({"head": head.name, "role": role, "split": source.split, "limit": source.limit})
    return list(seen.values())


def find_moved_data(entries: list[dict[str, Any]], data_dir: Path) -> dict[str, str]:
    """Recorded data paths that no longer exist (a moved clone, another machine), each mapped to the file under
    data_dir with the same name and SHA-256 as recorded, where there is one."""
    moved = {}
    for entry in entries:
        recorded = Path(entry["path"])
        if recorded.exists():
            continue
        found = next((path for path in sorted(data_dir.rglob(recorded.name)) if file_sha256(path) == entry["sha256"]),
                     None)
        if found is None:
            log.warning("%s: no file of that name and contents under %s", recorded, data_dir)
        else:
            moved[entry["path"]] = str(found.resolve())
            log.info("%s found at %s", recorded, found)
    return moved
