"""Markdown tables of a sweep's finished trials, read from its MLflow runs (also while it runs, or after it was
stopped): per variant over seeds (median [IQR], mean with a Student-t 95% CI), paired differences against the
job's reference arm (paired t, exact sign-flip p), and the job's own comparisons (LoT minus teacher-only).

    python scripts/sweep_tables.py repro-smat [--results-dir teachsweep-results] [--metric simulability/test ...]
"""

from __future__ import annotations

import argparse

from teachsweep.jobs import JOBS
from teachsweep.metrics import PAIRED_METHOD, T_METHOD, seed_summaries
from teachsweep.results import DEFAULT_RESULTS, open_sweep, trial_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS)
    parser.add_argument("--metric", action="append", help="metrics to tabulate (default: the job's scores)")
    args = parser.parse_args()
    sweep = open_sweep(args.name, args.results_dir)
    job = JOBS[sweep.spec.job]
    metrics = args.metric or list(dict.fromkeys(sweep.spec.metric_names + job.scores))
    merged = trial_rows(sweep)
    summaries = seed_summaries(merged, metrics, job.reference_arm)
    if summaries:
        ref = job.reference_arm
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
    comparisons = job.compare(merged, metrics)
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
