"""A figure per registered study, drawn from its committed result rows (docs/results/<study>.json, written by
scripts/sweep_tables.py), so a figure can never drift from its data: one panel per endpoint, primary first, each
seed's two compared arms joined by a line (the pairing the test uses), the arms' means, and the paired difference
with its interval in the panel's title.

    python scripts/study_figures.py docs/results/study_lot_imitation.json [...] [--out-dir docs/figures]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def per_seed(table: dict[str, Any], label: str, metric: str) -> dict[Any, float]:
    return {t["seed"]: t["metrics"][metric] for t in table["trials"] if t["label"] == label and metric in t["metrics"]}


def metric_of(endpoint: str) -> str:
    return endpoint.split(" ")[0]  # "imitation/test_kl of alpha1 at teacher steps"


def draw_by_teacher(axis, endpoint: dict[str, Any]) -> None:
    """An endpoint by teacher arm: its paired difference and interval (the students' per-teacher-seed values are
    averaged inside the by-teacher table, which the rows keep)."""
    diff, low, high = endpoint["diff"], endpoint["ci_low"], endpoint["ci_high"]
    axis.errorbar([0], [diff], yerr=[[diff - low], [high - diff]], fmt="o", color="black", capsize=4)
    axis.axhline(0, color="0.6", linewidth=0.8)
    axis.set_xticks([0], [f"{endpoint['students']} students:\n{endpoint['teacher']} − baseline"], fontsize=8)
    axis.set_ylabel(f"difference in {metric_of(endpoint['endpoint'])}", fontsize=8)
    role = "PRIMARY" if endpoint["role"] == "primary" else "secondary"
    axis.set_title(
        f"{role}\n{diff:+.3g} [{low:+.3g}, {high:+.3g}], p {endpoint['p_value']:.2g}, "
        f"{endpoint['n_seeds']} teacher seeds",
        fontsize=8,
    )


def draw(table: dict[str, Any], out: Path) -> Path:
    endpoints = table["endpoints"]
    figure, axes = plt.subplots(1, len(endpoints), figsize=(3.4 * len(endpoints), 3.6), squeeze=False)
    for axis, endpoint in zip(axes[0], endpoints, strict=True):
        if endpoint.get("teacher"):
            draw_by_teacher(axis, endpoint)
            continue
        metric = metric_of(endpoint["endpoint"])
        first, second = endpoint["compared"].split(" − ")
        a, b = per_seed(table, first, metric), per_seed(table, second, metric)
        seeds = sorted(set(a) & set(b), key=str)
        for seed in seeds:
            axis.plot([0, 1], [b[seed], a[seed]], color="0.6", linewidth=0.8, marker="o", markersize=3)
        for x, values in ((0, [b[s] for s in seeds]), (1, [a[s] for s in seeds])):
            axis.plot([x - 0.15, x + 0.15], [sum(values) / len(values)] * 2, color="black", linewidth=2.5)
        axis.set_xticks([0, 1], [second, first], fontsize=8)
        axis.set_xlim(-0.4, 1.4)
        axis.set_ylabel(metric, fontsize=8)
        role = "PRIMARY" if endpoint["role"] == "primary" else "secondary"
        axis.set_title(
            f"{role}\n{endpoint['diff']:+.3g} [{endpoint['ci_low']:+.3g}, {endpoint['ci_high']:+.3g}], "
            f"p {endpoint['p_value']:.2g}, {len(seeds)} seeds",
            fontsize=8,
        )
    figure.suptitle(f"{table['sweep']}: each seed's pair, arm means (bars); paired Student-t 95%", fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    for path in args.tables:
        print(draw(json.loads(path.read_text()), args.out_dir / f"{path.stem}.png"))


if __name__ == "__main__":
    main()
