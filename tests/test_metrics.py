"""Intervals over seeds (Student-t, exact sign-flip permutation) and plausibility under truncation."""

import itertools

import numpy as np
import pytest
from scipy import stats

from teachsweep import metrics, models
from teachsweep.plausibility import mean_plausibility, rationale_plausibility


def bootstrap_ci(values: np.ndarray, resamples: int = 10_000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap CI of the mean: what the over-seed tables once used, kept here to show why not."""
    rng = np.random.default_rng(seed)
    if len(values) < 2:
        return float("nan"), float("nan")
    means = rng.choice(values, size=(resamples, len(values)), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def test_t_interval_covers_the_true_mean_as_advertised_and_the_percentile_bootstrap_does_not():
    """2,000 draws of 5 normal values: the 95% t-interval covers the mean 93-97% of the time; the percentile
    bootstrap (what the tables used before) is shown beside it."""
    rng = np.random.default_rng(0)
    draws = rng.normal(loc=3.0, scale=2.0, size=(2000, 5))
    t_cover = np.mean([lo <= 3.0 <= hi for lo, hi in map(metrics.t_interval, draws)])
    boot_cover = np.mean([lo <= 3.0 <= hi for lo, hi in (bootstrap_ci(d, resamples=1000) for d in draws)])
    message = f"t-interval coverage {t_cover:.3f}, percentile bootstrap coverage {boot_cover:.3f}"
    assert 0.93 <= t_cover <= 0.97, message
    assert boot_cover < 0.90, message  # the reason the over-seed tables moved to t-intervals


def test_t_interval_equals_the_textbook_formula():
    values = [0.81, 0.84, 0.79, 0.83, 0.80]
    half = stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / np.sqrt(5)
    assert metrics.t_interval(values) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert all(np.isnan(metrics.t_interval([1.0])))


def test_sign_flip_p_value_is_exact_on_five_seeds():
    # All five differences positive: only the all-plus and all-minus patterns are as extreme: p = 2/32.
    assert metrics.sign_flip_p_value([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    d = np.array([0.3, -0.1, 0.2, 0.05, -0.02])
    extreme = sum(abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12 for s in itertools.product([-1, 1], repeat=5))
    assert metrics.sign_flip_p_value(d) == pytest.approx(extreme / 32)
    assert metrics.sign_flip_p_value([0.0, 0.0]) == 1.0


def test_paired_difference_uses_paired_t_and_names_its_method():
    a = {0: 0.85, 9: 0.84, 11: 0.86, 30: 0.83, 69: 0.85}
    b = {0: 0.82, 9: 0.83, 11: 0.82, 30: 0.82, 69: 0.83, 99: 0.5}  # seed 99 has no partner: left out
    out = metrics.paired_difference(a, b)
    d = [a[s] - b[s] for s in a]
    assert out["n_seeds"] == 5 and out["diff_mean"] == pytest.approx(np.mean(d))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(metrics.t_interval(d))
    assert out["p_value"] == pytest.approx(2 / 32)
    assert "Student-t" in out["method"] and "sign-flip" in out["method"]


def test_plausibility_ranks_only_the_words_the_model_saw_and_reports_what_was_cut():
    """A rationale word past max_length has no score; ranking it at 0 pulled AUC and AP down."""
    tokenizer = models.load_tokenizer("tiny-bert")
    good = tokenizer.convert_tokens_to_ids("good")
    words = ["good"] + ["plain"] * 30 + ["good"] * 6
    rationale = np.array([1] + [0] * 30 + [1] * 6)
    all_cut = (["plain"] * 30 + ["good"], np.array([0] * 30 + [1]))  # its visible rationale is all 0: skipped

    def scores_of(batch):  # high on the rationale word, low elsewhere (pre-softmax)
        return (batch["input_ids"] == good).float() * 5.0

    found = rationale_plausibility(
        [(words, rationale), all_cut], tokenizer, scores_of, max_length=16, batch_size=8, device="cpu"
    )
    assert found["auc"] == 1.0 and found["ap"] == 1.0 and found["recall_at_k"] == 1.0
    assert found["n"] == 1.0
    assert found["rationale_cut_fraction"] == pytest.approx(7 / 8)  # 6 of 7 words cut, and the other example's one
    # What scoring the cut words at 0 gives: the cut rationale words rank below every seen word.
    padded = mean_plausibility([(np.r_[np.full(1, 0.9), np.full(14, 0.01), np.zeros(22)], rationale)])
    assert padded["auc"] < 0.9


def test_steps_to_a_common_target_is_the_first_evaluation_reaching_the_worse_arms_best():
    curves = {
        "lot": {0: [(10, 300.0), (20, 200.0), (30, 150.0), (40, 160.0)], 1: [(10, 250.0), (20, 180.0)]},
        "teacher_only": {0: [(10, 280.0), (20, 210.0), (30, 220.0)], 1: [(10, 175.0), (20, 170.0)]},
    }
    steps = metrics.convergence_comparison(curves, higher_is_better=False)  # perplexity: lower is better
    # seed 0: bests 150 and 210, common target 210: lot reaches it at 20 (200), teacher-only at 20 (210)
    # seed 1: bests 180 and 170, target 180: lot reaches it at 20, teacher-only at 10 (175)
    assert steps == {"lot": {0: 20.0, 1: 20.0}, "teacher_only": {0: 20.0, 1: 10.0}}
    assert metrics.steps_to_target([(5, 0.5), (10, 0.9)], 0.8, higher_is_better=True) == 10.0
    assert np.isnan(metrics.steps_to_target([(5, 0.5)], 0.8, higher_is_better=True))


def test_scores_by_teacher_pair_each_arm_with_the_baseline_teacher_of_the_same_seed():
    teachers = {
        "a": {"label": "teacher_only", "seed": 0, "scores": {"acc": 0.70}},
        "b": {"label": "teacher_only", "seed": 1, "scores": {"acc": 0.80}},
        "c": {"label": "lot", "seed": 0, "scores": {"acc": 0.75}},
        "d": {"label": "lot", "seed": 1, "scores": {"acc": 0.90}},
    }
    students = [
        {"teacher": "a", "variant": "none", "scores": {"sim": 0.50}},
        {"teacher": "b", "variant": "none", "scores": {"sim": 0.60}},
        {"teacher": "c", "variant": "none", "scores": {"sim": 0.50}},
        {"teacher": "c", "variant": "none", "scores": {"sim": 0.70}},  # a second student seed: averaged first
        {"teacher": "d", "variant": "none", "scores": {"sim": 0.65}},
        {"teacher": "gone", "variant": "none", "scores": {"sim": 0.0}},  # a teacher not in the sweep: ignored
    ]
    rows = metrics.by_teacher(teachers, students, reference="teacher_only")
    assert [(r["teacher"], r["variant"], r["metric"]) for r in rows] == [
        ("teacher_only", "", "acc"),
        ("lot", "", "acc"),
        ("teacher_only", "none", "sim"),
        ("lot", "none", "sim"),
    ]
    lot_acc, lot_sim = rows[1], rows[3]
    assert lot_acc["mean"] == pytest.approx(0.825) and lot_acc["n_seeds"] == 2
    # differences 0.05 and 0.10: mean 0.075, half-width t(0.975, 1) * sd / sqrt(2) = 12.706 * 0.035355 / 1.41421
    assert lot_acc["vs_reference_diff_mean"] == pytest.approx(0.075)
    assert lot_acc["vs_reference_ci_high"] - 0.075 == pytest.approx(12.706 * 0.0353553 / 2**0.5, rel=1e-3)
    assert lot_sim["mean"] == pytest.approx((0.60 + 0.65) / 2)  # seed 0's two students averaged to 0.60
    assert lot_sim["vs_reference_diff_mean"] == pytest.approx(((0.60 - 0.50) + (0.65 - 0.60)) / 2)
    assert lot_sim["vs_reference_p_value"] == pytest.approx(0.5)  # both differences positive: 2 of 4 sign patterns
    assert "vs_reference_diff_mean" not in rows[0] and "vs_reference_diff_mean" not in rows[2]
