"""Metrics: a JSONL log (one record per line, the source of truth), a CSV view of it, and PNG plots.

Records are dicts with a "kind" ("train", "eval", or a stage's own) and a "step". The CSV is rebuilt from the
JSONL with one column per key ever seen, so stages can log whatever they like without declaring it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path


class MetricsLogger:
    """Append records to out_dir/{name}.jsonl; write {name}.csv and {name}.png on flush().

    On resume, `truncate_after(step)` drops records logged after the checkpoint the run resumes from, so the
    log of an interrupted-then-resumed run reads like an uninterrupted one."""

    def __init__(self, out_dir, name: str = "metrics", *, enabled: bool = True, plot: bool = True,
                 plot_keys: dict[str, list[tuple[str, str]]] | None = None):
        self.out_dir, self.enabled, self.plot = Path(out_dir), enabled, plot
        self.jsonl, self.csv, self.png = (self.out_dir / f"{name}.{ext}" for ext in ("jsonl", "csv", "png"))
        # Panel title -> [(record kind, key)]: what the PNG shows. Default: the loss curve.
        self.plot_keys = plot_keys or {"loss": [("train", "loss"), ("eval", "val_loss")],
                                       "learning rate": [("train", "lr")]}
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        if self.enabled and self.jsonl.is_file():
            kept = [r for r in self.records() if r.get("step", 0) <= step]
            tmp = self.jsonl.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.jsonl)

    def flush(self) -> None:
        if not self.enabled:
            return
        records = self.records()
        keys = list(dict.fromkeys(k for r in records for k in r))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(records)
        if self.plot and records:
            plot_curves(records, self.png, self.plot_keys)


def plot_curves(records: list[dict], path, panels: dict[str, list[tuple[str, str]]]) -> None:
    """One panel per entry of `panels`, each a line per (kind, key) over step. Uses the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels.items()):
        for kind, key in series:
            pts = [(r["step"], r[key]) for r in records
                   if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=f"{kind} {key}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
