"""Steps to a common validation target and converged test scores of a LoT sweep's arms.

    python scripts/lot_convergence.py repro-lot [--results-dir teachsweep-results]

For every variant and seed: the teacher's validation curve of each arm (LoT, teacher-only at matched teacher
steps, teacher-only at matched model steps) from its MLflow run; the common target is the worst of the arms' best
validation scores on that seed; the table gives, per arm, the teacher steps and model steps at which the teacher
first reached it, and the teacher's test score at its best validation epoch. Intervals: Student-t 95% over seeds;
LoT minus each arm paired by seed (paired t, exact sign-flip p)."""

from __future__ import annotations

import argparse

import numpy as np

from teachsweep import metrics
from teachsweep.results import DEFAULT_RESULTS, open_sweep, trial_runs
from teachsweep.tracking import RetryingClient


def curves_of(client, run_id: str, score: str) -> list[tuple[float, float, float]]:
    """[(teacher steps, model steps, validation score)] per epoch, in order."""
    by_step = {}
    for name in (score, "steps/teacher", "steps/model"):
        for m in client.get_metric_history(run_id, name):
            by_step.setdefault(m.step, {})[name] = m.value
    rows = [v for _, v in sorted(by_step.items()) if len(v) == 3]
    return [(v["steps/teacher"], v["steps/model"], v[score]) for v in rows]


def variant_of(label: str) -> str:
    """'lm-lot', 'lm-teacher_only', 'lm-teacher_only-N5' -> 'lm'."""
    for arm in ("-teacher_only", "-lot"):
        if arm in label:
            return label[: label.index(arm)]
    return label


def fmt(values: dict[int, float]) -> str:
    xs = [v for v in values.values() if v == v]
    if not xs:
        return "—"
    low, high = metrics.t_interval(xs)
    return f"{np.mean(xs):.4g} ({low:.4g}, {high:.4g})" if len(xs) > 1 else f"{xs[0]:.4g}"


def fmt_diff(a: dict[int, float], b: dict[int, float]) -> str:
    d = metrics.paired_difference(a, b)
    return f"{d['diff_mean']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}], p={d['p_value']:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS)
    args = parser.parse_args()
    sweep = open_sweep(args.name, args.results_dir)
    client = RetryingClient(sweep.tracking_uri)
    runs = trial_runs(sweep)
    runs = runs[runs["status"] == "FINISHED"]
    runs = runs.assign(variant=[variant_of(label) for label in runs["tags.teachsweep.label"]])
    for variant, group in runs.groupby("variant"):
        is_lm = "metrics.teacher/val_ppl" in group and group["metrics.teacher/val_ppl"].notna().any()
        score = "teacher/val_ppl" if is_lm else "teacher/val_acc"
        test = "teacher/test_ppl_at_best_val" if is_lm else "teacher/test_acc_at_best_val"
        curves: dict[str, dict[int, list]] = {}
        tests: dict[str, dict[int, float]] = {}
        for _, row in group.iterrows():
            arm, seed = row["tags.teachsweep.label"].removeprefix(f"{variant}-"), int(row["params.seed"])
            curves.setdefault(arm, {})[seed] = curves_of(client, row["run_id"], score)
            tests.setdefault(arm, {})[seed] = row[f"metrics.{test}"]
        arms = sorted(curves, key=lambda a: (a != "lot", a))
        by_unit = {
            unit: metrics.convergence_comparison(
                {a: {s: [(c[i], c[2]) for c in curve] for s, curve in curves[a].items()} for a in arms},
                higher_is_better=not is_lm,
            )
            for i, unit in ((0, "teacher steps"), (1, "model steps"))
        }
        n = len(set.intersection(*(set(v) for v in tests.values())))
        print(f"\n### {variant} ({n} seeds; Student-t 95% over seeds; LoT minus arm: paired t, exact sign-flip p)\n")
        print(f"| arm | {test} | teacher steps to target | model steps to target | epochs run |")
        print("|---|---|---|---|---|")
        for arm in arms:
            epochs = {s: float(len(c)) for s, c in curves[arm].items()}
            print(
                f"| {arm} | {fmt(tests[arm])} | {fmt(by_unit['teacher steps'][arm])} | "
                f"{fmt(by_unit['model steps'][arm])} | {fmt(epochs)} |"
            )
        for arm in arms[1:]:
            print(
                f"| LoT − {arm} | {fmt_diff(tests['lot'], tests[arm])} | "
                f"{fmt_diff(by_unit['teacher steps']['lot'], by_unit['teacher steps'][arm])} | "
                f"{fmt_diff(by_unit['model steps']['lot'], by_unit['model steps'][arm])} | |"
            )


if __name__ == "__main__":
    main()
