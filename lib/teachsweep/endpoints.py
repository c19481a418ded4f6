"""A registered study's endpoints read from a sweep's comparisons: the primary first, each with its paired
difference over seeds, its interval (clipped to what the metric can take: a difference of accuracies lies in
[-1, 1]) and the method that gave it, and a line saying when an endpoint found nothing to compare."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from teachsweep.metrics import PAIRED_METHOD, PROPORTION, interval_text
from teachsweep.spec import Endpoint, SweepSpec


@dataclass(frozen=True)
class EndpointResult:
    role: str  # "primary" or "secondary"
    endpoint: Endpoint
    compared: str  # what was compared with what: "cartpole-lot − teacher_only"
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int
    method: str
    students: str | None = None  # by teacher arm: the student variant compared (the row of the by-teacher table)


def difference_bounds(metric: str) -> tuple[float, float]:
    """What a difference of this metric can take: [-1, 1] for proportions (accuracies, agreement, simulability)."""
    return (-1.0, 1.0) if PROPORTION.search(metric) else (-math.inf, math.inf)


def clipped(metric: str, low: float, high: float) -> tuple[float, float, bool]:
    lowest, highest = difference_bounds(metric)
    clipped_low, clipped_high = max(low, lowest), min(high, highest)
    return clipped_low, clipped_high, (clipped_low, clipped_high) != (low, high)


STATS = ("diff_mean", "ci_low", "ci_high", "p_value", "n_seeds")


def matching(
    spec: SweepSpec, endpoint: Endpoint, comparisons, summaries, reference: str | None, by_teacher=None
) -> list[dict]:
    """The comparison rows an endpoint names, as {compared, diff, ci_low, ci_high, p_value, n_seeds}; `by_teacher`
    are the students' rows by the arm of their teacher (teacher_effect), for endpoints that name a `teacher`."""
    found = []
    if endpoint.teacher is not None:  # students of one teacher arm minus those of the baseline teachers
        for row in by_teacher or []:
            if (row["metric"], row["teacher"]) != (endpoint.metric, endpoint.teacher) or not row["variant"]:
                continue
            if "vs_reference_diff_mean" not in row or endpoint.variant not in (None, row["variant"]):
                continue
            stats = {k: row[f"vs_reference_{k}"] for k in STATS}
            compared = f"{row['variant']} students of {row['teacher']} − of {row['reference']} teachers"
            found.append({"compared": compared, **stats, "students": row["variant"]})
        return found
    if endpoint.budget is not None:  # LoT minus its teacher-only arm at that budget
        for row in comparisons:
            if row["metric"] != endpoint.metric or row["budget"] != endpoint.budget:
                continue
            if endpoint.variant is not None and endpoint.variant not in (row["variant"], row["trial"]):
                continue
            stats = {k: row[k] for k in STATS}
            found.append({"compared": f"{row['trial']} − {row['baseline_label']}", **stats})
        return found
    against = endpoint.versus or reference
    for row in summaries:  # a variant minus the job's reference arm, or minus the variant it is registered against
        if row["metric"] != endpoint.metric or against is None or f"vs_{against}_diff_mean" not in row:
            continue
        if endpoint.variant is not None and row["label"] != endpoint.variant:
            continue
        stats = {k: row[f"vs_{against}_{k}"] for k in STATS}
        found.append({"compared": f"{row['label']} − {against}", **stats})
    return found


def endpoint_results(
    spec: SweepSpec,
    comparisons: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
    reference: str | None,
    by_teacher: list[dict[str, Any]] | None = None,
) -> list[EndpointResult]:
    if spec.study is None:
        return []
    results = []
    for where, endpoint in spec.study.named():
        role = where.partition(".")[0]  # primary or secondary
        for row in matching(spec, endpoint, comparisons, summaries, reference, by_teacher):
            low, high, was_clipped = clipped(endpoint.metric, row["ci_low"], row["ci_high"])
            method = PAIRED_METHOD + (", clipped to the metric's bounds" if was_clipped else "")
            results.append(
                EndpointResult(
                    role,
                    endpoint,
                    row["compared"],
                    row["diff_mean"],
                    low,
                    high,
                    row["p_value"],
                    row["n_seeds"],
                    method,
                    row.get("students"),
                )
            )
    return results


def endpoint_lines(spec: SweepSpec, results: list[EndpointResult]) -> list[str]:
    """One line per endpoint result, the primary first; an endpoint that matched nothing says so."""
    if spec.study is None:
        return []
    lines = []
    for where, endpoint in spec.study.named():
        role = where.partition(".")[0]
        mine = [r for r in results if r.endpoint is endpoint]
        if not mine:
            versus = f" minus {endpoint.versus}" if endpoint.versus else ""
            versus += " minus the baseline teachers' students" if endpoint.teacher else ""
            why = (
                "no students of that teacher arm and its baseline" if endpoint.teacher else "no finished paired trials"
            )
            lines.append(f"{role} endpoint {endpoint.describe()}{versus}: nothing to compare ({why})")
        planned = len(spec.seeds)
        for r in mine:
            if endpoint.teacher is not None:  # paired by the teachers' seeds, however many the earlier sweep ran
                seeds = f"{r.n_seeds} teacher seeds"
            else:
                seeds = f"{r.n_seeds} seeds" if r.n_seeds == planned else f"{r.n_seeds} of {planned} seeds"
            short = (
                f"; fewer than the {spec.study.min_seeds} registered: seeds failed or did not finish"
                if r.n_seeds < spec.study.min_seeds
                else ""
            )
            lines.append(
                f"{role} endpoint {endpoint.describe()}, {r.compared}: {r.diff:+.4g} "
                f"{interval_text(r.ci_low, r.ci_high, signed=True)}, p {r.p_value:.2g} ({seeds}{short}; {r.method})"
            )
    return lines
