"""Aggregation over seeds and test points.

Over seeds (a handful of values) intervals are Student-t: of a mean, and of a mean paired difference, with the
exact sign-flip permutation p-value of the difference. A percentile bootstrap over 5 values under-covers a 95%
interval (tests/test_metrics.py measures it), so the bootstrap is kept only for intervals over test points."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

T_METHOD = "Student-t 95% over seeds"
PAIRED_METHOD = "paired Student-t 95% over seeds; exact sign-flip permutation p"
SEED_KEY = re.compile(r"^(?P<metric>.+)@seed(?P<seed>-?\d+)$")


def per_seed(metrics: dict[str, float], metric: str) -> dict[int, float]:
    """Values of `metric` per seed from a trial's `metric@seedN` keys."""
    out = {}
    for key, value in metrics.items():
        match = SEED_KEY.match(key)
        if match and match["metric"] == metric:
            out[int(match["seed"])] = float(value)
    return out


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (nan for fewer than 2 values)."""
    from scipy import stats  # heavy: scipy, for the t quantiles only (the CLI's tables load without it)

    xs = np.asarray(list(values), dtype=float)
    if len(xs) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, df=len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs))
    return float(xs.mean() - half), float(xs.mean() + half)


def sign_flip_p_value(differences, exact_up_to: int = 16, resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided permutation p-value of mean(differences) = 0 under random signs: exact (all 2^n sign patterns)
    up to `exact_up_to` values, Monte Carlo beyond."""
    d = np.asarray(list(differences), dtype=float)
    if len(d) == 0:
        return float("nan")
    if len(d) <= exact_up_to:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(resamples, len(d)))
    means = np.abs((signs * d).mean(axis=1))
    observed = abs(d.mean())
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def subsample_bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 500,
    fraction: float = 0.5,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """CI of `statistic(rows)` over n test points from `resamples` random halves drawn without replacement
    (SMaT's protocol: 500 resamples of 50% of the test points)."""
    rng = np.random.default_rng(seed)
    size = max(2, int(n * fraction))
    values = [statistic(rng.choice(n, size=size, replace=False)) for _ in range(resamples)]
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """mean(a - b) over the seeds both have, its std, the paired Student-t 95% CI and the exact sign-flip
    permutation p-value."""
    seeds = sorted(set(a) & set(b))
    diffs = np.asarray([a[s] - b[s] for s in seeds])
    low, high = t_interval(diffs)
    return {
        "diff_mean": float(diffs.mean()) if len(diffs) else float("nan"),
        "diff_std": float(diffs.std(ddof=1)) if len(diffs) > 1 else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "p_value": sign_flip_p_value(diffs),
        "n_seeds": len(seeds),
        "method": PAIRED_METHOD,
    }


def summarize(values: dict[int, float]) -> dict[str, float]:
    """Mean, std and the Student-t 95% CI of the mean over seeds."""
    xs = list(values.values())
    low, high = t_interval(xs)
    return {
        "mean": statistics.fmean(xs) if xs else float("nan"),
        "std": statistics.stdev(xs) if len(xs) > 1 else float("nan"),
        "ci_low": low,
        "ci_high": high,
    }


def merge_seed_trials(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a grid whose trials differ only by seed become one row with `metric@seedN` values."""
    merged: dict[str, dict[str, Any]] = {}
    out = []
    for trial in trials:
        if "seed" not in trial["params"]:
            out.append(trial)
            continue
        seed = trial["params"]["seed"]
        row = merged.setdefault(
            trial["label"],
            {
                **trial,
                "params": {k: v for k, v in trial["params"].items() if k != "seed"},
                "metrics": {},
                "trial_id": trial["label"],
                "status": "OK",
            },
        )
        if trial["status"] != "OK":
            continue
        row["metrics"] |= {f"{k}@seed{seed}": v for k, v in trial["metrics"].items() if "@seed" not in k}
    return out + list(merged.values())


def seed_summaries(
    trials: list[dict[str, Any]], metrics: list[str], reference: str | None = None, versus: list[str] = ()
) -> list[dict[str, Any]]:
    """Per label (variant) and metric over seeds: median and IQR, mean with a Student-t CI, the mean of the
    per-seed test-point CIs where the job reports them (`<metric>_ci_low/high`), and the paired difference
    to the `reference` label (SMaT's "no explanation" students) and to each label in `versus` (a study's other
    comparisons) when it ran with the same seeds (`vs_<label>_diff_mean`, ...)."""
    rows = []
    by_label = {t["label"]: t for t in trials if t["status"] == "OK"}
    for trial in by_label.values():
        for metric in metrics:
            values = per_seed(trial["metrics"], metric)
            if len(values) < 2:
                continue
            xs = np.asarray(list(values.values()))
            low, high = t_interval(xs)
            bounded = PROPORTION.search(metric) is not None  # a proportion's interval stays inside [0, 1]
            if bounded:
                low, high = max(low, 0.0), min(high, 1.0)
            q25, median, q75 = np.quantile(xs, [0.25, 0.5, 0.75])
            row = {
                "label": trial["label"],
                "metric": metric,
                "n_seeds": len(xs),
                "median": float(median),
                "q25": float(q25),
                "q75": float(q75),
                "mean": float(xs.mean()),
                "ci_low": low,
                "ci_high": high,
                "method": T_METHOD + (", clipped to [0, 1]" if bounded else ""),
            }
            for bound in ("ci_low", "ci_high"):
                per_seed_bound = per_seed(trial["metrics"], f"{metric}_{bound}")
                if per_seed_bound:
                    row[f"test_points_{bound}"] = statistics.fmean(per_seed_bound.values())
            for other in dict.fromkeys([reference, *versus]):
                if other not in by_label or trial["label"] == other:
                    continue
                difference = paired_difference(values, per_seed(by_label[other]["metrics"], metric))
                if bounded:  # a difference of proportions lies in [-1, 1]
                    difference["ci_low"] = max(difference["ci_low"], -1.0)
                    difference["ci_high"] = min(difference["ci_high"], 1.0)
                row |= {f"vs_{other}_{k}": v for k, v in difference.items() if k != "method"}
                row["vs_method"] = PAIRED_METHOD
            rows.append(row)
    return rows


def steps_to_target(curve: list[tuple[float, float]], target: float, higher_is_better: bool) -> float:
    """The step count of the first evaluation on `curve` ((steps, validation score) in training order) that
    reaches `target`; nan when none does."""
    for steps, value in curve:
        if (value >= target) if higher_is_better else (value <= target):
            return float(steps)
    return float("nan")


def convergence_comparison(
    curves: dict[str, dict[int, list[tuple[float, float]]]], higher_is_better: bool
) -> dict[str, dict[int, float]]:
    """Per arm and seed, the steps to reach the common target of that seed: the worst of the arms' best
    validation scores (a level every arm reaches). `curves[arm][seed]` = [(steps, validation score), ...]."""
    seeds = set.intersection(*(set(by_seed) for by_seed in curves.values()))
    pick_best, pick_worst = (max, min) if higher_is_better else (min, max)
    out: dict[str, dict[int, float]] = {arm: {} for arm in curves}
    for seed in sorted(seeds):
        target = pick_worst(pick_best(v for _, v in curves[arm][seed]) for arm in curves)
        for arm in curves:
            out[arm][seed] = steps_to_target(curves[arm][seed], target, higher_is_better)
    return out


# ------------------------------------------------------------------------------- one trial's uncertainty

STUDENT_T = "Student-t 95%"
WILSON = "Wilson score 95%"
BOOTSTRAP = "bootstrap 95%"
MOVER_METHOD = "difference of independent 95% intervals (MOVER, Newcombe)"
PROPORTION = re.compile(r"(^|/)(\w*_)?acc(_|$)|^(agreement|simulability)/")
SPLITS = {"val": "validation", "test": "test"}


class Interval(NamedTuple):
    """A 95% interval with what it was computed by and on."""

    point: float
    low: float
    high: float
    label: str  # the method over what it ran on, e.g. "Wilson score 95% over 300 validation examples"
    method: str
    split: str | None  # "validation", "test", or None where the metric's name does not say


def interval_text(low: float, high: float, signed: bool = False) -> str:
    """How every 95% interval is written, in the CLI, the verdict and the report: square brackets, 4 significant
    digits, '[0.6771, 0.7771]'; a difference's bounds signed, '[-0.04854, +0.09489]'."""
    if low != low or high != high:  # NaN: a mean over one seed, a difference over one pair
        return "(no interval)"
    style = "+.4g" if signed else ".4g"
    return f"[{low:{style}}, {high:{style}}]"


def split_of(metric: str) -> str | None:
    """The evaluation split a metric was measured on, from its name: `teacher/best_val_acc` -> validation,
    `teacher/test_acc_at_best_val` -> test; None for anything else (RL returns, losses)."""
    name = metric.rsplit("/", 1)[-1].removeprefix("best_")
    return next((split for prefix, split in SPLITS.items() if name.startswith(prefix)), None)


def wilson_interval(proportion: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion measured on n examples (nan for n = 0)."""
    from scipy import stats  # heavy: scipy, for the t quantiles only (the CLI's tables load without it)

    if n <= 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + level / 2)
    centre = (proportion + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n))
    return float(centre - half), float(centre + half)


def examples_metric(metric: str) -> str | None:
    """The count a proportion metric was measured on: `examples/val` for validation scores (best_val included),
    `examples/test` for test scores; None when the metric is not a proportion of examples."""
    split = split_of(metric)
    if not PROPORTION.search(metric) or split is None:
        return None
    return "examples/val" if split == "validation" else "examples/test"


def is_wilson(metrics: dict[str, float], metric: str, low: float, high: float) -> bool:
    """Whether (low, high) is the Wilson interval of `metric` on its examples: runs logged before the Wilson bounds
    had keys of their own stored them as `<metric>_ci_low/_ci_high`, the keys of a job's own interval."""
    count = examples_metric(metric)
    if not count or count not in metrics:
        return False
    return bool(np.allclose((low, high), wilson_interval(float(metrics[metric]), int(metrics[count])), atol=1e-9))


def interval_of(metrics: dict[str, float], metric: str) -> Interval | None:
    """One trial's `metric` with its 95% interval: Student-t over its seeds when it ran several; else the job's own
    interval over test points (`<metric>_ci_low/high`, SMaT's bootstrap); else, for a proportion of a known number
    of examples, the Wilson interval that `with_intervals` logs. None when nothing says how uncertain it is."""
    split = split_of(metric)
    seeds = per_seed(metrics, metric)
    if len(seeds) >= 2:
        low, high = t_interval(seeds.values())
        over = f"{len(seeds)} seeds" + (f" ({split} split)" if split else "")
        return Interval(statistics.fmean(seeds.values()), low, high, f"{STUDENT_T} over {over}", STUDENT_T, split)
    if metric not in metrics:
        return None
    point, count = float(metrics[metric]), examples_metric(metric)
    own = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
    if None not in own and not is_wilson(metrics, metric, *own):
        points = f"{split} points" if split else "its evaluation points"
        return Interval(point, float(own[0]), float(own[1]), f"{BOOTSTRAP} over {points}", BOOTSTRAP, split)
    if count and count in metrics and 0 <= point <= 1:
        n = int(metrics[count])
        low, high = wilson_interval(point, n)
        return Interval(point, low, high, f"{WILSON} over {n} {split} examples", WILSON, split)
    return None


def interval_labels(rows_metrics: list[dict[str, float]], metric: str) -> list[str]:
    """The distinct labels of `metric`'s intervals over several trials' metrics (empty: none has one)."""
    return list(dict.fromkeys(own.label for m in rows_metrics if (own := interval_of(m, metric)) is not None))


def mover_difference(a: tuple[float, float, float], b: tuple[float, float, float]) -> tuple[float, float, float]:
    """a - b with a 95% interval from the two independent intervals (point, low, high) of a and b (MOVER: Zou &
    Donner 2008; for Wilson intervals this is Newcombe's hybrid score interval)."""
    (pa, la, ua), (pb, lb, ub) = a, b
    d = pa - pb
    return d, d - float(np.hypot(pa - la, ub - pb)), d + float(np.hypot(ua - pa, pb - lb))


def compare_to_best(best: dict[str, Any], other: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """best - other on `metric` with a 95% interval: paired by seed when both ran the same >= 2 seeds, else from
    the two trials' own intervals. None when either has no interval."""
    a, b = per_seed(best["metrics"], metric), per_seed(other["metrics"], metric)
    if len(set(a) & set(b)) >= 2:
        difference = paired_difference(a, b)
        return {
            "diff": difference["diff_mean"],
            "low": difference["ci_low"],
            "high": difference["ci_high"],
            "method": PAIRED_METHOD,
        }
    ia, ib = interval_of(best["metrics"], metric), interval_of(other["metrics"], metric)
    if ia is None or ib is None:
        return None
    d, low, high = mover_difference(ia[:3], ib[:3])
    return {"diff": d, "low": low, "high": high, "method": MOVER_METHOD}


def with_intervals(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus `<metric>_wilson_low/_wilson_high` for each proportion measured on a known number of examples
    (`examples/val` or `examples/test`, the split in the metric's name) that has no interval of the job's own: what
    a run logs so that MLflow shows how uncertain each accuracy is, and by which method."""
    out = dict(metrics)
    for metric, value in metrics.items():
        count = examples_metric(metric)
        if count and count in metrics and f"{metric}_ci_low" not in metrics and 0 <= value <= 1:
            low, high = wilson_interval(float(value), int(metrics[count]))
            out[f"{metric}_wilson_low"], out[f"{metric}_wilson_high"] = low, high
    return out


def by_teacher(
    teachers: dict[str, dict[str, Any]], students: list[dict[str, Any]], reference: str
) -> list[dict[str, Any]]:
    """How scores depend on the arm of the teacher, for a study whose later stage trained students on every teacher
    of an earlier one. `teachers`: {trial id: {label, seed, scores}} (one trial per teacher seed); `students`:
    [{teacher: trial id, variant, scores}]. One row per (teacher label, student variant, metric), the teacher's own
    scores under student variant '': the mean over teacher seeds with its Student-t interval and, for every label
    but `reference`, the difference to the `reference` teacher of the same seed (the same student variant), paired
    t with the sign-flip p. A teacher's several students of one variant (student seeds) are averaged first."""
    values: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for teacher in teachers.values():
        for metric, value in teacher["scores"].items():
            values.setdefault((teacher["label"], "", metric), {}).setdefault(teacher["seed"], []).append(value)
    for student in students:
        teacher = teachers.get(student["teacher"])
        if teacher is None:
            continue
        for metric, value in student["scores"].items():
            key = (teacher["label"], student["variant"], metric)
            values.setdefault(key, {}).setdefault(teacher["seed"], []).append(value)
    means = {key: {seed: statistics.fmean(xs) for seed, xs in seeds.items()} for key, seeds in values.items()}
    rows = []
    order = sorted(means.items(), key=lambda item: (item[0][1], item[0][2], item[0][0] != reference, item[0][0]))
    for (label, variant, metric), seeds in order:
        row = {
            "teacher": label,
            "variant": variant,
            "metric": metric,
            "n_seeds": len(seeds),
            **summarize(seeds),
            "method": T_METHOD,
        }
        baseline = means.get((reference, variant, metric))
        if label != reference and baseline:
            paired = paired_difference(seeds, baseline)
            row |= {f"vs_reference_{k}": v for k, v in paired.items()} | {"reference": reference}
        rows.append(row)
    return rows


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
