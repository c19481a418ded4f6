"""Markdown tables of a sweep's finished trials, read from its MLflow runs (also while it runs, or after it was
stopped): per variant over seeds (median [IQR], mean with a Student-t 95% CI), paired differences against the
job's reference arm (paired t, exact sign-flip p), and the job's own comparisons (LoT minus teacher-only).

    python scripts/sweep_tables.py repro-smat [--results-dir teachsweep-results] [--metric simulability/test ...]
        [--out docs/results/<name>.json] [--from-json]

`--out` also writes the rows the tables come from (each trial's label, seed and metric values), the summaries,
the comparisons, and the commit the sweep ran (its MLflow parent run's tag) and was read with; `--from-json`
prints the tables from that file alone, without the sweep.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

from teachsweep.endpoints import endpoint_lines, endpoint_results
from teachsweep.jobs import JOBS
from teachsweep.metrics import PAIRED_METHOD, T_METHOD, seed_summaries
from teachsweep.results import DEFAULT_RESULTS, open_sweep, trial_rows, trial_runs
from teachsweep.teacher_effect import teacher_effect
from teachsweep.tracking import RetryingClient


def read_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def rows_of(name: str, results_dir: str, metrics: list[str] | None) -> dict[str, Any]:
    """Everything the tables need, read from the sweep's MLflow runs."""
    sweep = open_sweep(name, results_dir)
    job = JOBS[sweep.spec.job]
    metrics = list(dict.fromkeys((metrics or sweep.spec.metric_names + job.scores) + sweep.spec.endpoint_metrics))
    merged = trial_rows(sweep)
    runs = trial_runs(sweep)
    parent = RetryingClient(sweep.tracking_uri).get_run(sweep.parent_run_id) if sweep.parent_run_id else None
    # the metrics tabulated, and what says how long each trial ran and on what (steps, learning rate, wall time)
    kept = lambda key: key.split("@")[0] in metrics or key.startswith(("steps/", "lr/", "time/"))  # noqa: E731
    trials = [
        {
            "trial_id": r["trial_id"],
            "label": r["label"],
            "seed": r["params"].get("seed"),
            "config": {k: v for k, v in r["params"].items() if k not in ("variant", "seed")},
            "metrics": {k: v for k, v in r["metrics"].items() if kept(k)},
        }
        for r in trial_rows(sweep, merge_seeds=False)
    ]
    summaries = seed_summaries(merged, metrics, job.reference_arm, sweep.spec.endpoint_references)
    comparisons = job.compare(merged, metrics)
    chained = teacher_effect(sweep) if sweep.spec.compares_teachers else None
    endpoints = endpoint_results(sweep.spec, comparisons, summaries, job.reference_arm, chained[1] if chained else None)
    return {
        "sweep": name,
        "job": sweep.spec.job,
        "reference_arm": job.reference_arm,
        "metrics": metrics,
        "ran_at_commit": parent.data.tags.get("mlflow.source.git.commit") if parent else None,
        "ran_dirty": parent.data.tags.get("teachsweep.git_dirty") if parent else None,
        # every trial's own: a resumed sweep may have run more than one commit
        "trial_commits": sorted({str(c) for c in runs.get("tags.mlflow.source.git.commit", []) if c == c}),
        "trial_dirty": sorted({str(c) for c in runs.get("tags.teachsweep.git_dirty", []) if c == c}),
        "read_with": read_commit(),
        "interval_method": T_METHOD,
        "difference_method": PAIRED_METHOD,
        "study": sweep.spec.study.model_dump() if sweep.spec.study else None,
        "endpoint_lines": endpoint_lines(sweep.spec, endpoints),
        "endpoints": [
            {
                "role": e.role,
                "endpoint": e.endpoint.describe(),
                "compared": e.compared,
                "diff": e.diff,
                "ci_low": e.ci_low,
                "ci_high": e.ci_high,
                "p_value": e.p_value,
                "n_seeds": e.n_seeds,
                "method": e.method,
            }
            | ({"teacher": e.endpoint.teacher, "students": e.students} if e.endpoint.teacher else {})
            for e in endpoints
        ],
        # students by the arm of their teacher: what endpoints by teacher arm are read from
        "by_teacher": chained[1] if chained else [],
        "trials": sorted(trials, key=lambda t: (t["label"], str(t["seed"]))),
        "summaries": summaries,
        "comparisons": comparisons,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS)
    parser.add_argument("--metric", action="append", help="metrics to tabulate (default: the job's scores)")
    parser.add_argument("--out", type=Path, help="also write the rows, summaries and comparisons here (JSON)")
    parser.add_argument("--from-json", action="store_true", help="print the tables from --out alone")
    args = parser.parse_args()
    if args.from_json:
        table = json.loads(args.out.read_text())
    else:
        table = rows_of(args.name, args.results_dir, args.metric)
        if args.out:
            args.out.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    print_tables(table)


def print_tables(table: dict[str, Any]) -> None:
    summaries, comparisons, ref = table["summaries"], table["comparisons"], table["reference_arm"]
    commits = ", ".join(table.get("trial_commits") or [table["ran_at_commit"] or "an unrecorded commit"])
    states = set(table.get("trial_dirty") or [table.get("ran_dirty") or "unknown"])
    dirty = "" if states == {"false"} else " (some runs from a tree with uncommitted changes, or not a checkout)"
    print(f"sweep {table['sweep']}, ran at {commits}{dirty}")
    for line in table.get("endpoint_lines", []):
        print(line)
    if table.get("endpoints"):
        print("\nRegistered endpoints, primary first (registered in the spec before the sweep ran)\n")
        print("| endpoint | | compared | difference [95% CI] | p | seeds | method |")
        print("|---|---|---|---|---|---|---|")
        for e in table["endpoints"]:
            diff = f"{e['diff']:+.4g} [{e['ci_low']:+.4g}, {e['ci_high']:+.4g}]"
            cells = [
                e["endpoint"],
                e["role"],
                e["compared"],
                diff,
                f"{e['p_value']:.3g}",
                str(e["n_seeds"]),
                e["method"],
            ]
            print("| " + " | ".join(cells) + " |")
    if summaries:
        print(f"\n{T_METHOD}" + (f"; vs {ref}: {PAIRED_METHOD}" if ref else "") + "\n")
        versus_head = f"vs {ref} (95% CI) | p |" if ref else ""
        print(f"| variant | metric | seeds | median [IQR] | mean (95% CI) | test-point CI | {versus_head}")
        print("|---|---|---|---|---|---|" + ("---|---|" if ref else ""))
        for r in summaries:
            points = ""
            if "test_points_ci_low" in r:
                points = f"[{r['test_points_ci_low']:.3f}, {r['test_points_ci_high']:.3f}]"
            versus = p_value = ""
            if f"vs_{ref}_diff_mean" in r:
                low, high = r[f"vs_{ref}_ci_low"], r[f"vs_{ref}_ci_high"]
                versus = f"{r[f'vs_{ref}_diff_mean']:+.4f} [{low:+.4f}, {high:+.4f}]"
                p_value = f"{r[f'vs_{ref}_p_value']:.3g}"
            median = f"{r['median']:.4g} [{r['q25']:.4g}, {r['q75']:.4g}]"
            mean = f"{r['mean']:.4g} ({r['ci_low']:.4g}, {r['ci_high']:.4g})"
            cells = [r["label"], r["metric"], str(r["n_seeds"]), median, mean, points]
            cells += [versus, p_value] if ref else []
            print("| " + " | ".join(cells) + " |")
    if comparisons:
        print(f"\nLoT minus teacher-only, {PAIRED_METHOD}\n")
        print("| variant | budget | metric | LoT (95% CI) | teacher-only (95% CI) | LoT − teacher-only | p | n |")
        print("|---|---|---|---|---|---|---|---|")
        for c in comparisons:
            lot = f"{c['lot_mean']:.4g} ({c['lot_ci_low']:.4g}, {c['lot_ci_high']:.4g})"
            alone = f"{c['teacher_only_mean']:.4g} ({c['teacher_only_ci_low']:.4g}, {c['teacher_only_ci_high']:.4g})"
            diff = f"{c['diff_mean']:+.4g} [{c['ci_low']:+.4g}, {c['ci_high']:+.4g}]"
            print(
                f"| {c['variant'] or '-'} | {c['budget']} | {c['metric']} | {lot} | {alone} | {diff} | "
                f"{c['p_value']:.3g} | {c['n_seeds']} |"
            )


if __name__ == "__main__":
    main()
