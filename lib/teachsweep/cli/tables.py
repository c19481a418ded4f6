"""What the commands print: rich tables that wrap instead of cutting, the verdict's lines, and how numbers,
intervals and parameters are written."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from teachsweep.cli.terminal import console
from teachsweep.metrics import PAIRED_METHOD, T_METHOD, interval_labels, interval_of, interval_text
from teachsweep.ranking import point_of, verdict_pick
from teachsweep.results import Sweep, best_trials
from teachsweep.spec import SweepSpec
from teachsweep.verdict import verdict, wrap_lines

if TYPE_CHECKING:  # heavy: pandas, and Ray under teachsweep.sweep
    from pandas import DataFrame

    from teachsweep.sweep import SweepOutcome


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def values_text(values: dict) -> str:
    return ", ".join(f"{k} {short(v)}" for k, v in values.items())


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={short(v)}" for k, v in params.items()) or "no parameters"


def with_interval(metrics: dict, metric: str) -> str:
    """A table cell: the value and, where the data supports one, its 95% interval (metrics.interval_of)."""
    own = interval_of(metrics, metric)
    return f"{own.point:.4g} {interval_text(own.low, own.high)}" if own else short(metrics.get(metric, ""))


def interval_caption(rows_metrics: list[dict], metrics: list[str]) -> str:
    """What each column's [low, high] was computed by and on, one line per metric; or that it has none."""
    lines = []
    for metric in metrics:
        labels = interval_labels(rows_metrics, metric)
        lines.append(f"{metric} [low, high]: {' or '.join(labels)}" if labels else f"{metric}: no interval")
    return "\n".join(lines)


def fitted_table(title: str, columns: list[str], **options: Any) -> Table:
    """A table whose headers and cells wrap instead of being cut with an ellipsis when the terminal is narrow: a
    metric's header breaks after its '/', anything else that cannot wrap at a space folds."""
    if "caption" in options:
        options["caption"] = escape(options["caption"])
    table = Table(title=escape(title), **options)
    for column in columns:
        table.add_column(escape(column).replace("/", "/\n"), overflow="fold")
    return table


def keep_whole(table: Table, width: int) -> Table:
    """The last column (an MLflow run id) never folds: a broken id cannot be copied."""
    table.columns[-1].min_width, table.columns[-1].no_wrap = width, True
    return table


def print_verdict(spec: SweepSpec, rows: list[dict]) -> None:
    """The verdict's sentences under 'verdict ', each wrapped to the terminal (verdict.wrap_lines)."""
    if len(spec.objectives) == 1:
        lines = wrap_lines(verdict(spec, rows), console.width - len("verdict "))
        console.print("[bold]verdict[/] " + escape("\n        ".join(lines)), soft_wrap=True, highlight=False)


def trials_table(outcome: SweepOutcome, searched: list[str], reported: list[str]) -> Table:
    """A finished run's trials: id, arm or label (FAILED where it failed), the searched parameters, and each
    reported metric with its interval."""
    table = fitted_table(
        f"sweep {outcome.spec.name}: {plural(len(outcome.trials), 'trial')} in {outcome.seconds:.0f} s",
        ["trial", "arm or label", *searched, *reported],
        caption=interval_caption([r["metrics"] for r in outcome.trials], reported),
        caption_justify="left",
    )
    for row in outcome.trials:
        metrics = [with_interval(row["metrics"], m) for m in reported]
        params = [short(row["params"].get(k, "")) for k in searched]
        table.add_row(
            row["trial_id"], row["label"] if row["status"] == "OK" else f"{row['label']} FAILED", *params, *metrics
        )
    # a trial id is what the verdict names and what `sweep:<name>/<trial>` takes: never folded
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max((len(str(row["trial_id"])) for row in outcome.trials), default=5)
    return table


def comparisons_table(comparisons: list[dict]) -> Table:
    """LoT minus teacher-only, per variant, trial, budget and metric, paired by seed."""
    columns = [
        "variant",
        "trial",
        "budget",
        "metric",
        "LoT mean ± std",
        "teacher-only mean ± std",
        "diff",
        "95% CI",
        "p",
        "seeds",
    ]
    table = fitted_table(f"LoT minus teacher-only ({PAIRED_METHOD})", columns)
    for c in comparisons:
        table.add_row(
            c["variant"] or "-",
            c["trial"],
            c["budget"],
            c["metric"],
            f"{c['lot_mean']:.4g} ± {c['lot_std']:.2g}",
            f"{c['teacher_only_mean']:.4g} ± {c['teacher_only_std']:.2g}",
            f"{c['diff_mean']:+.4g}",
            f"[{c['ci_low']:+.4g}, {c['ci_high']:+.4g}]",
            f"{c['p_value']:.3g}",
            str(c["n_seeds"]),
        )
    return table


def seed_summary_table(rows: list[dict]) -> Table:
    """Per variant over seeds: median (IQR), mean with a Student-t 95% CI, the per-seed test-point CI (bootstrap
    over test points), and the paired difference to the `none` variant when there is one (paired t, sign-flip p)."""
    table = fitted_table(
        f"over seeds: median (IQR), mean [95% CI] ({T_METHOD}); vs none: {PAIRED_METHOD}",
        ["variant", "metric", "seeds", "median (IQR)", "mean [95% CI]", "test-point CI", "vs none [95% CI]", "p"],
    )
    for r in rows:
        points = f"[{r['test_points_ci_low']:.4g}, {r['test_points_ci_high']:.4g}]" if "test_points_ci_low" in r else ""
        versus = (
            f"{r['vs_none_diff_mean']:+.4g} [{r['vs_none_ci_low']:+.4g}, {r['vs_none_ci_high']:+.4g}]"
            if "vs_none_diff_mean" in r
            else ""
        )
        p_value = f"{r['vs_none_p_value']:.3g}" if "vs_none_p_value" in r else ""
        table.add_row(
            r["label"],
            r["metric"],
            str(r["n_seeds"]),
            f"{r['median']:.4g} ({r['q25']:.4g}–{r['q75']:.4g})",
            f"{r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}]",
            points,
            versus,
            p_value,
        )
    return table


def teacher_effect_table(name: str, teachers: str, rows: list[dict]) -> Table:
    """A chained stage's scores by the arm of its teacher, against the baseline teacher (`teacher_effect`)."""
    table = fitted_table(
        f"{name} by the teacher from {teachers}: mean ({T_METHOD}); vs the baseline teacher: "
        f"{PAIRED_METHOD}, paired by teacher seed",
        ["teacher", "student variant", "metric", "seeds", "mean [95% CI]", "vs baseline teacher [95% CI]", "p"],
    )
    for r in rows:
        versus = (
            f"{r['vs_reference_diff_mean']:+.4g} [{r['vs_reference_ci_low']:+.4g}, {r['vs_reference_ci_high']:+.4g}]"
            if "vs_reference_diff_mean" in r
            else ""
        )
        table.add_row(
            r["teacher"],
            r["variant"] or "(the teacher)",
            r["metric"],
            str(r["n_seeds"]),
            f"{r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}]",
            versus,
            f"{r['vs_reference_p_value']:.3g}" if "vs_reference_p_value" in r else "",
        )
    return table


def best_table(sweep: Sweep, rows: list[dict]) -> Table | None:
    """The trial the verdict names: its id, arm, objective with its interval, parameters and MLflow run."""
    picked = verdict_pick(sweep.spec, rows)
    if picked is None:
        return None
    metric, objective = sweep.spec.metric_names[0], sweep.spec.objectives[0]
    labels = interval_labels([picked["metrics"]], metric)
    table = fitted_table(
        f"{sweep.name}: best trial ({objective.metric} {objective.mode})",
        ["trial", "arm or label", metric, "params", "MLflow run"],
        caption=f"{metric} [low, high]: {labels[0]}" if labels else f"{metric}: no interval",
        caption_justify="left",
    )
    spec = sweep.spec
    shown = list(spec.space) or sorted({k for v in spec.variants.values() for k in v} | {"arm"})
    params = {k: picked["params"][k] for k in shown if k in picked["params"]}
    value = with_interval(picked["metrics"], metric) if labels else short(point_of(picked, metric))
    table.add_row(str(picked["trial_id"]), picked["label"], value, params_text(params), str(picked["mlflow_run_id"]))
    return keep_whole(table, 32)


def pareto_table(sweep: Sweep, runs: DataFrame) -> Table | None:
    """A sweep of several objectives: its Pareto front, each trial with its values, parameters and MLflow run."""
    front = best_trials(sweep, runs)
    if not front:
        return None
    trial_of = dict(zip(runs["run_id"], runs["tags.teachsweep.trial_id"], strict=True)) if len(runs) else {}
    objectives = ", ".join(f"{o.metric} {o.mode}" for o in sweep.spec.objectives)
    table = fitted_table(f"{sweep.name}: Pareto front ({objectives})", ["trial", "values", "params", "MLflow run"])
    for row in front:
        table.add_row(
            str(trial_of.get(row.get("mlflow_run_id"), "?")),
            values_text(row["values"]),
            params_text(row["params"]),
            str(row.get("mlflow_run_id")),
        )
    return keep_whole(table, 32)
