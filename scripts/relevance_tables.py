"""The relevance reproduction's tables, from the explain sweep's MLflow runs, written to a committed rows file.

    python scripts/relevance_tables.py repro-relevance [--results-dir teachsweep-results]
        [--rows docs/results/repro_relevance.json]

Variants are `<domain>-t<teacher seed>`. Per domain and explainer: the mean perturbation AUC over the teachers
with a Student-t 95% interval over teachers. Per Chefer method minus baseline: each teacher's mean per-example
difference with its paired t interval over that teacher's examples, and the mean over teachers with a Student-t
interval over the teachers' means. The rows file holds every number the tables print; `--from-rows` prints the
tables again from it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from teachsweep.layout import DEFAULT_RESULTS
from teachsweep.metrics import t_interval
from teachsweep.results import open_sweep, trial_rows

EXPLAINERS = ["raw_attention", "rollout", "attention_gradcam", "relevance", "lrp", "partial_lrp", "full_lrp"]
PAIRS = [("relevance", "rollout"), ("relevance", "raw_attention"), ("lrp", "rollout"), ("lrp", "raw_attention")]
TESTS = ("positive", "negative")


def rows_of(name: str, results_dir: str) -> dict:
    sweep = open_sweep(name, results_dir)
    teachers = []
    for row in trial_rows(sweep, merge_seeds=False):
        domain, _, seed = row["label"].rpartition("-t")
        teachers.append(
            {
                "domain": domain,
                "teacher_seed": int(seed),
                "trial": row["trial_id"],
                "metrics": {k: v for k, v in row["metrics"].items() if "/" in k},
            }
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "sweep": name,
        "spec": f"sweeps/{name.replace('-', '_')}.yaml",
        "reader_commit": commit,
        "teachers": sorted(teachers, key=lambda t: (t["domain"], t["teacher_seed"])),
    }


def mean_and_interval(values: list[float]) -> str:
    low, high = t_interval(values)
    return f"{np.mean(values):.3f} ({low:.3f}, {high:.3f})"


def signed(values: list[float]) -> str:
    low, high = t_interval(values)
    return f"{np.mean(values):+.3f} [{low:+.3f}, {high:+.3f}]"


def print_tables(rows: dict) -> None:
    domains = sorted({t["domain"] for t in rows["teachers"]})
    by_domain = {d: [t for t in rows["teachers"] if t["domain"] == d] for d in domains}
    print(f"\nsweep {rows['sweep']} ({rows['spec']}); mean over teachers, Student-t 95% over teachers\n")
    head = " | ".join(f"{d} pos ↓ | {d} neg ↑" for d in domains)
    print(f"| explainer | {head} |\n|---|" + "---|" * (2 * len(domains)))
    for name in EXPLAINERS:
        cells = []
        for d in domains:
            for test in TESTS:
                values = [t["metrics"].get(f"{name}/{test}_auc") for t in by_domain[d]]
                cells.append(mean_and_interval([v for v in values if v is not None]) if None not in values else "—")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nChefer minus baseline, per example (paired on the same example and teacher): per teacher, mean with a")
    print("paired t 95% interval over its examples; over teachers, mean of the teachers' means, t 95% over teachers\n")
    print(
        "| domain | difference | test | "
        + " | ".join(f"teacher {t['teacher_seed']}" for t in by_domain[domains[0]])
        + " | over teachers |"
    )
    print("|---|---|---|" + "---|" * (len(by_domain[domains[0]]) + 1))
    for d in domains:
        for a, b in PAIRS:
            for test in TESTS:
                key = f"diff/{a}-{b}/{test}_auc"
                if any(key not in t["metrics"] for t in by_domain[d]):
                    continue
                cells = [
                    f"{t['metrics'][key]:+.3f} [{t['metrics'][key + '_t95_low']:+.3f}, "
                    f"{t['metrics'][key + '_t95_high']:+.3f}]"
                    for t in by_domain[d]
                ]
                over = signed([t["metrics"][key] for t in by_domain[d]])
                print(f"| {d} | {a} − {b} | {test} | " + " | ".join(cells) + f" | {over} |")
    for d in domains:
        accuracy = [t["metrics"].get("teacher/test_acc") for t in by_domain[d]]
        if None not in accuracy:
            print(f"\n{d} teachers' test accuracy: " + ", ".join(f"{a:.3f}" for a in accuracy))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS)
    parser.add_argument("--rows", default=None, help="where to write the rows (default docs/results/<name>.json)")
    parser.add_argument("--from-rows", action="store_true", help="print the tables from the rows file alone")
    args = parser.parse_args()
    path = Path(args.rows or f"docs/results/{args.name.replace('-', '_')}.json")
    if args.from_rows:
        rows = json.loads(path.read_text())
    else:
        rows = rows_of(args.name, args.results_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")
    print_tables(rows)


if __name__ == "__main__":
    main()
