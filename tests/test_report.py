"""Uncertainty on every number a sweep shows: intervals against hand computations, the verdict's reading of them,
and the report of a real sweep (figures present, numbers equal to the MLflow runs, nothing fetched from outside)."""

import re

import pytest

from teachsweep.metrics import (
    MOVER_METHOD,
    PAIRED_METHOD,
    T_METHOD,
    WILSON_METHOD,
    examples_metric,
    interval_of,
    mover_difference,
    wilson_interval,
    with_intervals,
)
from teachsweep.results import verdict
from teachsweep.spec import parse_spec


def test_wilson_and_newcombe_intervals_match_published_values():
    # Newcombe (1998), Stat. Med. 17:873, example: 56/70 against 48/80, Wilson intervals, method 10.
    low, high = wilson_interval(56 / 70, 70)
    assert (low, high) == pytest.approx((0.6918, 0.8770), abs=1e-4)
    a, b = (56 / 70, low, high), (48 / 80, *wilson_interval(48 / 80, 80))
    assert mover_difference(a, b) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # never below 0, unlike Wald's


def test_each_metric_gets_the_interval_its_data_supports():
    assert examples_metric("teacher/best_val_acc") == "examples/val"
    assert examples_metric("teacher/test_acc_at_best_val") == "examples/test"
    assert examples_metric("teacher/val_ppl") is None and examples_metric("teacher/eval_return") is None
    one_seed = {"teacher/best_val_acc": 0.8, "examples/val": 100.0, "teacher/val_ppl": 90.0}
    point, low, high, method = interval_of(one_seed, "teacher/best_val_acc")
    assert (point, method) == (0.8, WILSON_METHOD) and (low, high) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    assert interval_of(one_seed, "teacher/val_ppl") is None  # a perplexity is not a proportion of examples
    seeds = {"simulability/test@seed0": 0.8, "simulability/test@seed1": 0.9, "simulability/test@seed2": 0.85}
    point, low, high, method = interval_of(seeds, "simulability/test")
    # mean 0.85, sd 0.05, t(0.975, 2) = 4.3027: half-width 4.3027 * 0.05 / sqrt(3) = 0.1242
    assert (
        method == T_METHOD and point == pytest.approx(0.85) and (low, high) == pytest.approx((0.7258, 0.9742), abs=1e-4)
    )


SPEC = "name: v\njob: lot\nconfig: {task: digits, teacher: cnn}\nspace: {alpha: {type: uniform, low: 0.1, high: 1}}\n"


def row(trial_id, accuracy, n=300, **params):
    return {"trial_id": trial_id, "label": params.get("arm", "lot"), "status": "OK", "params": params,
            "metrics": {"teacher/best_val_acc": accuracy, "examples/val": float(n)}}  # fmt: skip


def test_the_verdict_says_when_the_best_is_within_noise():
    spec = parse_spec(SPEC)
    rows = [row("a", 0.70, alpha=0.1), row("b", 0.69, alpha=0.5), row("c", 0.50, alpha=0.9),
            row("base", 0.68, arm="teacher_only")]  # fmt: skip
    lines = verdict(spec, rows)
    assert lines[0].startswith("best on teacher/best_val_acc (max): trial a [lot] 0.7 (") and WILSON_METHOD in lines[0]
    # 0.70 vs 0.69 on 300 examples each: within noise; 0.70 vs 0.50: not
    assert lines[1].startswith("1 of 2 other trials are within noise of the best") and MOVER_METHOD in lines[1]
    assert lines[2].startswith("vs teacher_only: +0.02 [") and "within noise" in lines[2]

    far = [row("a", 0.95, n=5000, alpha=0.1), row("b", 0.50, n=5000, alpha=0.5)]
    assert verdict(spec, far)[1].startswith("the best is distinguishable from all 1 other trials")


def test_the_verdict_pairs_by_seed_when_trials_share_seeds():
    spec = parse_spec(SPEC)
    seeds = lambda values: {f"teacher/best_val_acc@seed{s}": v for s, v in enumerate(values)}  # noqa: E731
    rows = [{"trial_id": "a", "label": "lot", "status": "OK", "params": {"alpha": 0.1},
             "metrics": seeds([0.80, 0.82, 0.84])},
            {"trial_id": "base", "label": "teacher_only", "status": "OK", "params": {"arm": "teacher_only"},
             "metrics": seeds([0.70, 0.71, 0.73])}]  # fmt: skip
    lines = verdict(spec, rows)
    # paired differences 0.10, 0.11, 0.11: mean 0.1067, sd 0.00577, half-width 4.3027 * 0.00577 / sqrt(3) = 0.01434
    assert re.search(r"vs teacher_only: \+0\.1067 \[\+0\.09232, \+0\.121\] \(distinguishable", lines[1]), lines[1]
    assert PAIRED_METHOD in lines[1]


def test_runs_log_each_accuracy_with_its_wilson_interval():
    logged = with_intervals({"teacher/val_acc": 0.8, "examples/val": 100.0, "teacher/val_ppl": 3.0,
                             "simulability/test": 0.9, "simulability/test_ci_low": 0.85})  # fmt: skip
    assert (logged["teacher/val_acc_ci_low"], logged["teacher/val_acc_ci_high"]) == pytest.approx(
        (0.7112, 0.8666), abs=1e-4
    )
    assert "teacher/val_ppl_ci_low" not in logged and "simulability/test_ci_high" not in logged  # own interval kept
