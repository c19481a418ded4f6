"""A sweep's report: one self-contained HTML file (figures embedded as PNG, no external URL), read from the sweep's
MLflow runs and Optuna study, written at the end of every sweep (`report.html` in its results directory, and an
artifact of its parent MLflow run) and by `teachsweep report NAME`.

Each figure fits the sweep it describes, and a caption says what it shows and how many seeds and examples stand
behind it: the verdict (best trial, how many are within noise of it, the best against the baseline arms); the
objective against each searched parameter; for LoT the alpha x N map and LoT-minus-teacher-only paired
differences; the Pareto front for several objectives; per-variant scores over seeds (simulability by explainer);
learning curves of the best trials; SMaT's head coefficients; RL return curves; for a stage whose students
learnt from every teacher of an earlier stage, each score by the teacher's arm."""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from teachsweep.endpoints import endpoint_lines, endpoint_results
from teachsweep.jobs import JOBS
from teachsweep.metrics import (
    PAIRED_METHOD,
    T_METHOD,
    examples_metric,
    interval_labels,
    interval_of,
    interval_text,
    per_seed,
    seed_summaries,
)
from teachsweep.ranking import is_baseline, pareto_front
from teachsweep.results import Sweep, run_artifact, trial_rows, trial_runs
from teachsweep.teacher_effect import teacher_effect
from teachsweep.tracking import RetryingClient
from teachsweep.verdict import verdict

STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
figure{margin:1em 0}figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:.9em;color:#444;max-width:900px}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
.verdict{background:#f4f6fa;border-left:4px solid #4a6fa5;padding:.6em 1em}code{background:#f2f2f2}"""


class Figure:
    """One figure of the report: a title, the PNG and a caption."""

    def __init__(self, title: str, fig, caption: str) -> None:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        self.title, self.caption = title, caption
        self.png = base64.b64encode(buffer.getvalue()).decode()

    def html(self) -> str:
        title, caption = html.escape(self.title), html.escape(self.caption)
        return (
            f'<h2>{title}</h2><figure><img alt="{title}" src="data:image/png;base64,{self.png}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )


# ---------------------------------------------------------------------------------------------- figures


def seed_counts(rows: list[dict[str, Any]]) -> str:
    """The numbers of seeds the rows were measured over, for a caption ("8" or "4, 8")."""
    return ", ".join(str(n) for n in sorted({row["n_seeds"] for row in rows}))


def subplots(nrows: int = 1, ncols: int = 1, *, figsize, **kwargs):
    """A figure outside pyplot's global state: drawing a report never changes a notebook's backend or figures."""
    fig = MplFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def value_and_error(row: dict[str, Any], metric: str) -> tuple[float, float, float] | None:
    """(point, lower error, upper error) of a trial's metric for error bars (zero errors without an interval)."""
    own = interval_of(row["metrics"], metric)
    if own is not None:
        return own.point, own.point - own.low, own.high - own.point
    seeds = per_seed(row["metrics"], metric)
    value = statistics.fmean(seeds.values()) if seeds else row["metrics"].get(metric)
    return None if value is None else (float(value), 0.0, 0.0)


def seeds_of(row: dict[str, Any], metric: str) -> int:
    return max(1, len(per_seed(row["metrics"], metric)))


def objective_vs_parameters(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Figure]:
    spec = sweep.spec
    metric = spec.metric_names[0]
    searched = [r for r in rows if not is_baseline(r, JOBS[spec.job])]
    figures = []
    for name, param in spec.space.items():
        points = [(r["params"].get(name), value_and_error(r, metric)) for r in searched]
        points = [(x, v) for x, v in points if x is not None and v is not None]
        if not points:
            continue
        fig, ax = subplots(figsize=(6, 3.6))
        categorical = param.type == "categorical" and not all(isinstance(x, int | float) for x, _ in points)
        values = [str(x) if categorical else float(x) for x, _ in points]
        discrete = categorical or param.type == "int"
        positions = [values_order(values).index(x) for x in values] if categorical else values
        xs = jittered(positions) if discrete else positions
        ax.errorbar(
            xs,
            [v[0] for _, v in points],
            yerr=[[v[1] for _, v in points], [v[2] for _, v in points]],
            fmt="o",
            capsize=3,
        )
        if categorical:
            ax.set_xticks(range(len(values_order(values))), values_order(values))
        baselines = [r for r in rows if is_baseline(r, JOBS[spec.job]) and value_and_error(r, metric)]
        for k, base in enumerate(baselines[:3]):  # the fixed arms (LoT's teacher-only) as bands to compare with
            value, low, high = value_and_error(base, metric)
            ax.axhline(value, color=f"C{k + 1}", lw=1, label=base["label"])
            ax.axhspan(value - low, value + high, color=f"C{k + 1}", alpha=0.15)
        if baselines:
            ax.legend(fontsize=7)
        if param.type == "loguniform":
            ax.set_xscale("log")
        if param.type == "int":  # a tick at each value tried, room for the spread points around it
            ax.set_xticks(sorted(set(values)), [str(int(v)) for v in sorted(set(values))])
            ax.set_xlim(min(values) - 0.5, max(values) + 0.5)
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        seeds = max(seeds_of(r, metric) for r in searched)
        arms = (
            f" Lines and bands: the fixed arms ({', '.join(b['label'] for b in baselines[:3])}) with their intervals."
            if baselines
            else ""
        )
        spread = " Points at the same value are spread sideways so that none hides another." if discrete else ""
        figures.append(
            Figure(
                f"{metric} against {name}",
                fig,
                f"Each point is one searched trial ({len(points)}), its final {metric}"
                f"{examples_words(searched, metric)}; bars are 95% intervals "
                f"({interval_words(searched, metric)}); {seeds} seed(s) per trial. Points whose bars "
                f"overlap a lot are not told apart by this sweep.{spread}{arms}",
            )
        )
    return figures


def values_order(values: list) -> list:
    return sorted(set(values), key=str)


def jittered(xs: list[float], width: float = 0.3) -> list[float]:
    """Points that share an x (trials at the same N, the same choice) spread evenly over `width` around it, in a
    fixed order: the figure is the same each time it is drawn."""
    out, seen = list(map(float, xs)), {}
    for k, x in enumerate(xs):
        seen.setdefault(x, []).append(k)
    for x, ks in seen.items():
        for rank, k in enumerate(ks):
            out[k] = x + (width * (rank / (len(ks) - 1) - 0.5) if len(ks) > 1 else 0.0)
    return out


def examples_words(rows: list[dict[str, Any]], metric: str) -> str:
    """', measured on 300 validation examples' (each trial's count of the metric's split; a range when they
    differ); '' when the metric is not a proportion of a known number of examples."""
    count = examples_metric(metric)
    counts = sorted({int(r["metrics"][count]) for r in rows if count and count in r["metrics"]})
    if not counts:
        return ""
    split = "validation" if count == "examples/val" else "test"
    amount = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f", measured on {amount} {split} examples"


def text_colour(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour, WCAG weights)."""
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if luminance > 0.179 else "white"


def interval_words(rows: list[dict[str, Any]], metric: str) -> str:
    labels = interval_labels([r["metrics"] for r in rows], metric)
    return "; ".join(labels) if labels else "none known: single measurements"


def alpha_n_map(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Figure]:
    """LoT: the mean objective over bins of alpha (ascending, log-spaced) and each N (ascending)."""
    spec = sweep.spec
    if not {"alpha", "student_steps"} <= set(spec.space):
        return []
    metric = spec.metric_names[0]
    lot = [r for r in rows if r["params"].get("arm", "lot") == "lot" and value_and_error(r, metric)]
    if len(lot) < 2:
        return []
    alphas = np.array([float(r["params"]["alpha"]) for r in lot])
    ns = sorted({int(r["params"]["student_steps"]) for r in lot})
    edges = (
        np.geomspace(alphas.min(), alphas.max() * (1 + 1e-9), 5)
        if alphas.min() > 0
        else np.linspace(alphas.min(), alphas.max() + 1e-9, 5)
    )
    grid = np.full((len(ns), len(edges) - 1), np.nan)
    counts = np.zeros_like(grid, dtype=int)
    for r, a in zip(lot, alphas, strict=True):
        i, j = ns.index(int(r["params"]["student_steps"])), min(np.searchsorted(edges, a, side="right") - 1, 3)
        value = value_and_error(r, metric)[0]
        grid[i, j] = value if counts[i, j] == 0 else (grid[i, j] * counts[i, j] + value) / (counts[i, j] + 1)
        counts[i, j] += 1
    fig, ax = subplots(figsize=(6.5, 1.2 + 0.5 * len(ns)))
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(len(edges) - 1), [f"{edges[k]:.3g}–{edges[k + 1]:.3g}" for k in range(len(edges) - 1)])
    ax.set_yticks(range(len(ns)), [str(n) for n in ns])
    ax.set_xlabel("alpha (bins, ascending)")
    ax.set_ylabel("N (student steps)")
    for i in range(len(ns)):
        for j in range(len(edges) - 1):
            if counts[i, j]:
                colour = text_colour(image.cmap(image.norm(grid[i, j])))
                ax.text(j, i, f"{grid[i, j]:.4g}\nn={counts[i, j]}", ha="center", va="center", color=colour, fontsize=8)
    return [
        Figure(
            "LoT: alpha × N",
            fig,
            f"Mean final {metric} of the LoT trials in each cell (n = trials in the cell; {len(lot)} in all)"
            f"{examples_words(lot, metric)}, alpha in four log-spaced bins. One-trial cells carry all its "
            "noise.",
        )
    ]


def comparison_forest(sweep: Sweep, comparisons: list[dict[str, Any]]) -> list[Figure]:
    """LoT minus teacher-only (or any job comparison), paired by seed, with intervals: one panel per metric."""
    rows = [c for c in comparisons if c.get("n_seeds", 0) >= 2]
    metrics = list(dict.fromkeys(c["metric"] for c in rows))[:6]
    if not metrics:
        return []
    pairs = list(dict.fromkeys((c["variant"], c["trial"], c["baseline_label"]) for c in rows))
    fig, axes = subplots(
        1, len(metrics), figsize=(2.2 + 2.6 * len(metrics), 1.0 + 0.35 * len(pairs)), sharey=True, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        for c in (c for c in rows if c["metric"] == metric):
            k = pairs.index((c["variant"], c["trial"], c["baseline_label"]))
            excludes_zero = c["ci_low"] > 0 or c["ci_high"] < 0
            ax.errorbar(
                [c["diff_mean"]],
                [k],
                xerr=[[c["diff_mean"] - c["ci_low"]], [c["ci_high"] - c["diff_mean"]]],
                fmt="o",
                capsize=3,
                color="C0" if excludes_zero else "0.4",
            )
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(metric, fontsize=8)
    axes[0][0].set_yticks(range(len(pairs)), [f"{t} vs {b}" for _, t, b in pairs], fontsize=7)
    seeds = seed_counts(rows)
    return [
        Figure(
            "LoT minus teacher-only, paired by seed",
            fig,
            f"One panel per metric, one row per LoT trial and its teacher-only arm (the budget is in the arm's "
            f"label: -N<n> = matched model steps): mean paired difference (LoT − teacher-only) and its 95% "
            f"interval ({PAIRED_METHOD}); {seeds} seeds. Blue: the interval excludes 0.",
        )
    ]


def pareto_figure(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Figure]:
    spec = sweep.spec
    if len(spec.objectives) < 2:
        return []
    (m1, o1), (m2, o2) = [(o.metric, o.mode) for o in spec.objectives[:2]]
    points = [(r["metrics"].get(m1), r["metrics"].get(m2)) for r in rows]
    points = [p for p in points if None not in p]
    front = pareto_front(spec, sweep.optuna_url)
    fig, ax = subplots(figsize=(5.5, 4))
    ax.scatter(*zip(*points, strict=True), color="0.6", label="trials") if points else None
    if front:
        fx, fy = zip(*sorted((f["values"][m1], f["values"][m2]) for f in front), strict=True)
        ax.plot(fx, fy, "o-", color="C3", label="Pareto front")
    ax.set_xlabel(f"{m1} ({o1})")
    ax.set_ylabel(f"{m2} ({o2})")
    ax.legend()
    return [
        Figure(
            "Pareto front",
            fig,
            f"{len(points)} trials on the first two objectives; red: the {len(front)} "
            "trials no other trial beats on both (Optuna's front of the searched trials).",
        )
    ]


def variant_forest(sweep: Sweep, summaries: list[dict[str, Any]]) -> list[Figure]:
    """Per variant (explainer, arm) over seeds: mean and Student-t interval, one panel per metric."""
    metrics = list(dict.fromkeys(s["metric"] for s in summaries))[:4]
    if not metrics:
        return []
    fig, axes = subplots(
        1, len(metrics), figsize=(4.5 * len(metrics), 0.9 + 0.35 * len(summaries) / len(metrics)), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        rows = [s for s in summaries if s["metric"] == metric]
        for k, s in enumerate(rows):
            ax.errorbar(
                [s["mean"]], [k], xerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]], fmt="o", capsize=3
            )
        ax.set_yticks(range(len(rows)), [s["label"] for s in rows], fontsize=8)
        ax.set_title(metric, fontsize=9)
    seeds = seed_counts(summaries)
    return [
        Figure(
            "Scores by variant, over seeds",
            fig,
            f"Mean over seeds with its 95% interval ({T_METHOD}); {seeds} seeds per variant. For SMaT sweeps "
            "the variants are the explainers, the score simulability.",
        )
    ]


def verdict_items(lines: list[str]) -> str:
    """The verdict's lines as list items that keep their nesting: a line's leading spaces (two per level, as the
    terminal prints them) become its indentation, which HTML would otherwise collapse."""
    items = []
    for line in lines:
        depth = (len(line) - len(line.lstrip(" "))) // 2
        items.append(f'<li style="margin-left:{1.5 * depth:g}em">{html.escape(line.strip())}</li>')
    return "".join(items)


def teacher_effect_figure(teachers: str, rows: list[dict[str, Any]]) -> list[Figure]:
    """A chained study's answer: each score against the arm of the teacher (the earlier sweep's labels, baseline
    first), one line per student variant, mean over teacher seeds with its Student-t interval."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))[:4]
    labels = list(dict.fromkeys(r["teacher"] for r in rows))
    if not metrics or len(labels) < 2:
        return []
    fig, axes = subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["metric"] == metric))
        for k, variant in enumerate(variants):
            line = {r["teacher"]: r for r in rows if r["metric"] == metric and r["variant"] == variant}
            xs = [i + 0.06 * (k - (len(variants) - 1) / 2) for i, label in enumerate(labels) if label in line]
            shown = [line[label] for label in labels if label in line]
            means = [r["mean"] for r in shown]
            errors = np.nan_to_num(
                [[r["mean"] - r["ci_low"] for r in shown], [r["ci_high"] - r["mean"] for r in shown]]
            )
            ax.errorbar(xs, means, yerr=errors, fmt="o-", capsize=3, label=variant or "the teacher itself")
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=7)
    seeds = ", ".join(str(n) for n in sorted({r["n_seeds"] for r in rows}))
    return [
        Figure(
            f"Scores by the teacher from {teachers}",
            fig,
            f"Each point: the mean over {seeds} teacher seeds with its 95% interval ({T_METHOD}); teachers "
            f"by their arm in {teachers}, students by variant (SMaT: the explainer). Differences to the "
            "baseline teacher, paired by teacher seed, are in the table below.",
        )
    ]


def teacher_effect_table(teachers: str, rows: list[dict[str, Any]]) -> str:
    head = "".join(
        f"<th>{c}</th>"
        for c in ["teacher", "student variant", "metric", "seeds", "mean [95%]", "vs baseline teacher [95%]", "p"]
    )
    body = []
    for r in rows:
        versus = (
            f"{r['vs_reference_diff_mean']:+.4g} "
            + interval_text(r["vs_reference_ci_low"], r["vs_reference_ci_high"], signed=True)
            if "vs_reference_diff_mean" in r
            else ""
        )
        # a sign-flip p over one pair is 1 by construction: not a test
        p_value = f"{r['vs_reference_p_value']:.3g}" if "vs_reference_p_value" in r and r["n_seeds"] > 1 else ""
        cells = [
            r["teacher"],
            r["variant"] or "(the teacher)",
            r["metric"],
            r["n_seeds"],
            f"{r['mean']:.4g} {interval_text(r['ci_low'], r['ci_high'])}",
            versus,
            p_value,
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    return (
        f"<h2>By teacher (from <code>{html.escape(teachers)}</code>)</h2><p>{html.escape(T_METHOD)}; vs the "
        f"baseline teacher: {html.escape(PAIRED_METHOD)}, paired by teacher seed</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table>"
    )


def curve_metric(spec_metric: str) -> str:
    """The per-epoch metric behind an objective: teacher/best_val_acc is the running best of teacher/val_acc."""
    return spec_metric.replace("/best_", "/")


def learning_curves(sweep: Sweep, rows: list[dict[str, Any]], top: int = 3) -> list[Figure]:
    spec = sweep.spec
    metric, mode = spec.metric_names[0], spec.mode_names[0]
    curve = curve_metric(metric)
    ranked = [r for r in rows if value_and_error(r, metric) and r.get("mlflow_run_id")]
    ranked.sort(key=lambda r: value_and_error(r, metric)[0], reverse=mode == "max")
    client = RetryingClient(sweep.tracking_uri)
    fig, ax = subplots(figsize=(6.5, 3.8))
    drawn = 0
    for row in ranked[:top]:
        run_id = first_seed_run(client, row["mlflow_run_id"]) or row["mlflow_run_id"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, curve))
        if len(history) < 2:
            continue
        ax.plot(*zip(*history, strict=True), "o-", ms=3, label=f"{row['label']} {row['trial_id']}")
        drawn += 1
    if not drawn:
        return []
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(curve)
    ax.legend(fontsize=8)
    return [
        Figure(
            "Learning curves of the best trials",
            fig,
            f"{curve} per epoch of the {drawn} best trials on {metric}{examples_words(ranked[:top], curve)} "
            "(for a trial that ran several seeds, its first seed).",
        )
    ]


def first_seed_run(client, trial_run_id: str) -> str | None:
    runs = client.search_runs(
        [client.get_run(trial_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{trial_run_id}' and tags.`teachsweep.role` = 'seed'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def rl_return_curves(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Figure]:
    """RL: the teacher's greedy evaluation return per epoch, mean over each trial's seeds (drawn when the runs
    recorded one)."""
    if not any("teacher/eval_return" in r["metrics"] or per_seed(r["metrics"], "teacher/eval_return") for r in rows):
        return []

    client = RetryingClient(sweep.tracking_uri)
    runs = trial_runs(sweep)
    if not len(runs):
        return []
    fig, ax = subplots(figsize=(6.5, 3.8))
    by_label: dict[str, list[list[tuple[int, float]]]] = {}
    for _, run in runs[runs["status"] == "FINISHED"].iterrows():
        ids = [run["run_id"]]
        seeds = client.search_runs(
            [run["experiment_id"]] if "experiment_id" in run else [client.get_run(run["run_id"]).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run['run_id']}'",
        )
        ids = [s.info.run_id for s in seeds] or ids
        for run_id in ids:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "teacher/eval_return"))
            if history:
                by_label.setdefault(run["tags.teachsweep.label"], []).append(history)
    for label, curves in sorted(by_label.items()):
        epochs = sorted({step for c in curves for step, _ in c})
        means = [statistics.fmean(v for c in curves for s, v in c if s == e) for e in epochs]
        ax.plot(epochs, means, "o-", ms=3, label=f"{label} ({len(curves)} runs)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (a fixed number of environment steps)")
    ax.set_ylabel("teacher greedy evaluation return")
    ax.legend(fontsize=7)
    return [
        Figure(
            "RL: evaluation return per epoch",
            fig,
            "The teacher's greedy return per epoch, averaged over each label's runs (seeds); each point is "
            "the mean of the evaluation episodes of that epoch.",
        )
    ]


def head_coefficients(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Figure]:
    """SMaT: the learned head coefficients (layers x heads) of the best trial that logged them."""

    client = RetryingClient(sweep.tracking_uri)
    metric, mode = sweep.spec.metric_names[0], sweep.spec.mode_names[0]
    ranked = sorted(
        (r for r in rows if value_and_error(r, metric) and r.get("mlflow_run_id")),
        key=lambda r: value_and_error(r, metric)[0],
        reverse=mode == "max",
    )
    for row in ranked:
        run_id = first_seed_run(client, row["mlflow_run_id"]) or row["mlflow_run_id"]
        path = run_artifact(sweep, run_id, "head_coefficients.json")
        if path is None:
            continue  # a trial without a learnable explainer
        coefficients = np.asarray(json.loads(path.read_text())["layers_by_heads"], dtype=float)
        fig, ax = subplots(figsize=(5, max(2.0, 1 + 0.4 * coefficients.shape[0])))  # (tick labels need 2 inches)
        image = ax.imshow(coefficients, aspect="auto", cmap="magma")
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        return [
            Figure(
                "SMaT head coefficients",
                fig,
                f"The explainer's normalised head coefficients of trial {row['trial_id']} ({row['label']}), "
                "the best on the objective that learned them (first seed).",
            )
        ]
    return []


# ---------------------------------------------------------------------------------------------- the page


def trials_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    metric = sweep.spec.metric_names[0]
    searched = list(sweep.spec.space)
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in ["trial", "label", *searched, metric, "95% interval", "method", "seeds"]
    )
    body = []
    for r in rows:
        own = interval_of(r["metrics"], metric)
        value = value_and_error(r, metric)
        cells = [
            r["trial_id"],
            r["label"],
            *[number(r["params"].get(k, "")) for k in searched],
            f"{value[0]:.4g}" if value else "",
            interval_text(own.low, own.high) if own else "",
            own.label if own else "no interval",
            seeds_of(r, metric),
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<h2>Trials</h2><table><tr>{head}</tr>{''.join(body)}</table>"


def number(value: Any) -> Any:
    """A parameter as a table shows it: a float to 4 significant digits (alpha 0.3162, not 0.31622776601683794)."""
    return f"{value:.4g}" if isinstance(value, float) else value


def comparisons_table(comparisons: list[dict[str, Any]]) -> str:
    if not comparisons:
        return ""
    head = "".join(
        f"<th>{c}</th>"
        for c in [
            "variant",
            "trial",
            "budget",
            "metric",
            "LoT",
            "teacher-only",
            "LoT − teacher-only [95%]",
            "p",
            "seeds",
        ]
    )
    body = []
    for c in comparisons:
        cells = [
            c["variant"] or "-",
            c["trial"],
            c["budget"],
            c["metric"],
            f"{c['lot_mean']:.4g}",
            f"{c['teacher_only_mean']:.4g}",
            f"{c['diff_mean']:+.4g} [{c['ci_low']:+.4g}, {c['ci_high']:+.4g}]",
            f"{c['p_value']:.3g}",
            c["n_seeds"],
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    return f"<p>{html.escape(PAIRED_METHOD)}</p><table><tr>{head}</tr>{''.join(body)}</table>"


def not_compared(sentences: list[str]) -> str:
    """The comparisons that could not be made, each with its reason."""
    if not sentences:
        return ""
    return "<p>Not compared:</p><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>"


def build_report(sweep: Sweep) -> str:
    spec = sweep.spec
    job = JOBS[spec.job]
    rows = trial_rows(sweep)
    metrics = list(dict.fromkeys(spec.metric_names + job.scores + spec.endpoint_metrics))
    comparisons, uncompared = job.compare(rows, metrics), job.uncompared(rows)
    comparison_section = (
        "<h2>Comparisons</h2>" + comparisons_table(comparisons) + not_compared(uncompared)
        if comparisons or uncompared
        else ""
    )
    summaries = seed_summaries(rows, metrics, job.reference_arm, spec.endpoint_references)
    figures: list[Figure] = []
    for make in (
        objective_vs_parameters,
        alpha_n_map,
        pareto_figure,
        learning_curves,
        rl_return_curves,
        head_coefficients,
    ):
        figures += make(sweep, rows)
    figures += comparison_forest(sweep, comparisons) + variant_forest(sweep, summaries)
    chained = teacher_effect(sweep)
    if chained:
        figures += teacher_effect_figure(*chained)
    lines = (
        verdict_items(verdict(spec, rows))
        if len(spec.objectives) == 1
        else "<li>several objectives: see the Pareto front</li>"
    )
    objectives = ", ".join(f"{o.metric} ({o.mode})" for o in spec.objectives)
    study = study_section(sweep, comparisons, summaries, chained[1] if chained else None)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>teachsweep report: {html.escape(spec.name)}
</title><style>{STYLE}</style></head><body>
<h1>Sweep <code>{html.escape(spec.name)}</code></h1>
<p>job <code>{html.escape(spec.job)}</code> · objective {html.escape(objectives)} · {len(rows)} finished trial rows
· seeds {html.escape(str(spec.seeds))} · MLflow parent run <code>{html.escape(str(sweep.parent_run_id))}</code></p>
{study}<div class="verdict"><b>Verdict</b><ul>{lines}</ul></div>
{"".join(f.html() for f in figures)}
{comparison_section}
{teacher_effect_table(*chained) if chained else ""}
{trials_table(sweep, rows)}
<p style="font-size:.8em;color:#666">Intervals: {html.escape(T_METHOD)} when a trial ran several seeds; else the
job's own interval over test points (SMaT's bootstrap), or a Wilson score interval over the evaluation examples of
the metric's split for accuracies and agreements; each caption and table names the one it shows; differences
between trials are paired by seed when both ran the same seeds, else combined from their two intervals
(MOVER).</p></body></html>"""


def study_section(
    sweep: Sweep,
    comparisons: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
    by_teacher: list[dict[str, Any]] | None = None,
) -> str:
    """A registered study's endpoints, the primary first, and a red line when any of its runs ran code with
    uncommitted changes (or code whose state is unknown)."""
    spec = sweep.spec
    if spec.study is None:
        return ""
    results = endpoint_results(spec, comparisons, summaries, JOBS[spec.job].reference_arm, by_teacher)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in endpoint_lines(spec, results))
    runs = trial_runs(sweep)
    states = set(runs.get("tags.teachsweep.git_dirty", [])) if len(runs) else set()
    commits = sorted(set(runs.get("tags.mlflow.source.git.commit", []))) if len(runs) else []
    warning = ""
    if states - {"false"}:
        warning = (
            '<p style="color:#b00020"><b>Run from code with uncommitted changes</b> (or not from a git checkout): '
            "its numbers cannot be traced to a commit.</p>"
        )
    commit_words = ", ".join(html.escape(str(c)) for c in commits if isinstance(c, str)) or "unknown"
    return (
        f'<div class="verdict"><b>Registered study</b> (fixed in the spec before it ran; commit {commit_words}; '
        f"seeds {html.escape(str(spec.seeds))})<ul>{items}</ul>{warning}</div>"
    )


def write_report(sweep: Sweep) -> tuple[Path, bool]:
    """Write `report.html` into the sweep's directory and log it to the sweep's parent MLflow run; False when it
    was not logged because the run's local artifact directory is not under the results directory any more (the
    directory moved: logging would recreate the old path)."""

    path = sweep.layout.report
    path.write_text(build_report(sweep))
    if not sweep.parent_run_id:
        return path, False
    client = RetryingClient(sweep.tracking_uri)
    artifacts = client.get_run(sweep.parent_run_id).info.artifact_uri
    if artifacts.startswith("file:") or "://" not in artifacts:
        local = Path(unquote(urlparse(artifacts).path) if artifacts.startswith("file:") else artifacts)
        if not local.resolve().is_relative_to(sweep.layout.root):
            return path, False
    client.log_artifact(sweep.parent_run_id, str(path))
    return path, True
