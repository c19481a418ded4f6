"""The verdict a sweep ends with: the best trial's held-out scores, with their intervals, against its baselines and
the other trials, in sentences wrapped for a terminal."""

from __future__ import annotations

import textwrap
from typing import Any

from teachsweep.jobs import JOBS
from teachsweep.metrics import compare_to_best, interval_of, interval_text, split_of
from teachsweep.ranking import is_baseline, point_of, verdict_candidates, verdict_pick
from teachsweep.spec import SweepSpec


def with_its_interval(row: dict[str, Any], metric: str) -> str:
    """'0.73 [0.6771, 0.7771] (Wilson score 95% over 300 validation examples)', or the value and '(no interval)'."""

    own = interval_of(row["metrics"], metric)
    if own is None:
        return f"{point_of(row, metric):.4g} (no interval)"
    return f"{own.point:.4g} {interval_text(own.low, own.high)} ({own.label})"


def noise_of(difference: dict[str, Any]) -> str:
    return "within noise" if difference["low"] <= 0 <= difference["high"] else "distinguishable"


def baselines_of(best: dict[str, Any], rows: list[dict[str, Any]], job) -> list[tuple[str, dict[str, Any] | None]]:
    """(budget, baseline arm or None where none finished) the best trial is judged against: the job's own matching
    (LoT: the teacher-only arm of its config at each budget), else the baseline arms of its variant and the job's
    reference arm (SMaT's `none`)."""
    if job.matches_baselines:
        return job.baselines(best, rows)
    variant = best["params"].get("variant", "")
    return [
        ("", r)
        for r in rows
        if r is not best
        and is_baseline(r, job)
        and (r["params"].get("variant", "") == variant or r["label"] == job.reference_arm)
    ]


def selection_words(best: dict[str, Any], metric: str, job) -> str:
    """Where the trial was picked: the job's words for its objective's split, else the split in the metric's name."""

    split = split_of(metric)
    where = job.selection_split(best["params"]) or (f"the {split} split" if split else None)
    return f"; picked on {where}" if where else ""


def versus_baselines(
    best: dict[str, Any], baselines: list[tuple[str, dict[str, Any] | None]], metric: str
) -> list[str]:
    """The best against each baseline arm on the objective."""

    lines = []
    for budget, base in baselines:
        if base is None:
            lines.append(f"vs its baseline arm at {budget}: none finished that stands for this trial; not compared")
        elif point_of(base, metric) is None:
            lines.append(f"vs {base['label']}: it reported no {metric}")
        elif (c := compare_to_best(best, base, metric)) is None:
            lines.append(f"vs {base['label']}: {point_of(best, metric) - point_of(base, metric):+.4g} (no interval)")
        else:
            lines.append(
                f"vs {base['label']}: {c['diff']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] ({noise_of(c)}; "
                f"{c['method']})"
            )
    return lines


def held_out(
    best: dict[str, Any], baselines: list[tuple[str, dict[str, Any] | None]], metric: str, scores: list[str]
) -> list[str]:
    """The best and each baseline on the job's first score of record the best reports, which played no part in
    picking it (the validation score of the best of many trials is biased upwards: the winner's curse)."""

    # the score of the model a trial keeps (its best-validation epoch) before the last epoch's
    kept_first = [s for s in scores if s.endswith("_at_best_val")] + [
        s for s in scores if not s.endswith("_at_best_val")
    ]
    score = next((s for s in kept_first if point_of(best, s) is not None), None)
    if score is None:
        return [f"held out: the best reported none of the scores of record ({', '.join(scores)})"] if scores else []
    if score == metric:
        return [f"{metric} is also the score of record: nothing held out checks the pick"]
    lines = [f"held out, not used to pick the trial: {score}", f"  best {with_its_interval(best, score)}"]
    for _, base in baselines:
        value = None if base is None else point_of(base, score)
        if value is None:
            continue
        c = compare_to_best(best, base, score)
        versus = (
            f"{c['diff']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] ({noise_of(c)})"
            if c
            else f"{point_of(best, score) - value:+.4g} (no interval)"
        )
        lines.append(f"  vs {base['label']} {value:.4g}: {versus}")
        if c:
            lines.append(f"    (difference: {c['method']})")
    return lines


def wrap_lines(lines: list[str], width: int = 100, indent: str = "  ") -> list[str]:
    """Lines (the verdict's sentences) cut at spaces to fit `width` columns; a continuation is indented past its
    line's own indentation, so each sentence still reads as one item. A word longer than the width stays whole."""

    out = []
    for line in lines:
        lead = line[: len(line) - len(line.lstrip())]
        out += textwrap.wrap(
            line, width, subsequent_indent=lead + indent, break_long_words=False, break_on_hyphens=False
        ) or [""]
    return out


def verdict(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """What the sweep found on its first objective, and how sure it is: the best trial with its interval and the
    split that picked it, how many trials are within noise of it (their difference to the best has a 95% interval
    containing 0), the best against each baseline arm, and then the same on the job's held-out score of record.
    Plain sentences, for the end of `run`, `best` and the report."""

    metric, mode = spec.metric_names[0], spec.mode_names[0]
    job = JOBS[spec.job]
    best = verdict_pick(spec, rows)
    if best is None:
        return [f"no finished trial reported {metric}"]
    candidates = verdict_candidates(spec, rows)
    lines = [
        f"best on {metric} ({mode}{selection_words(best, metric, job)}): trial {best['trial_id']} "
        f"[{best['label']}] {with_its_interval(best, metric)}"
    ]
    variant = best["params"].get("variant", "")
    others = [r for r in candidates if r is not best and r["params"].get("variant", "") == variant]
    if others:
        compared = [(r, compare_to_best(best, r, metric)) for r in others]
        known = [(r, c) for r, c in compared if c is not None]
        close = [r for r, c in known if c["low"] <= 0 <= c["high"]]
        if not known:
            lines.append(f"{len(others)} other trial(s): no interval to tell them apart from the best")
        elif close:
            lines.append(
                f"{len(close)} of {len(others)} other trials are within noise of the best (their difference "
                f"to it has a 95% interval containing 0: {known[0][1]['method']}); the best is not a clear "
                "winner"
            )
        else:
            lines.append(f"the best is distinguishable from all {len(known)} other trials ({known[0][1]['method']})")
    baselines = baselines_of(best, rows, job)
    return lines + versus_baselines(best, baselines, metric) + held_out(best, baselines, metric, job.scores)
