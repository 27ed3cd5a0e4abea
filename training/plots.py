"""Training curves as a PNG, from the rows of metrics.jsonl."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per metric; each row contributes the numeric metrics it holds at its `step`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "epoch", "elapsed_s") and isinstance(value, (int, float)):
                series[key].append((row["step"], float(value)))
    if not series:
        return
    names = sorted(series)
    columns = min(3, len(names))
    rows_count = (len(names) + columns - 1) // columns
    figure, axes = plt.subplots(rows_count, columns, figsize=(5 * columns, 3.2 * rows_count), squeeze=False)
    for axis, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
