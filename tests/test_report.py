"""Uncertainty on every number a sweep shows: intervals against hand computations, the verdict's reading of them,
and the report of a real sweep (figures present, numbers equal to the MLflow runs, nothing fetched from outside)."""

import re

import pytest

from teachsweep.metrics import (
    MOVER_METHOD,
    PAIRED_METHOD,
    examples_metric,
    interval_of,
    mover_difference,
    wilson_interval,
    with_intervals,
)
from teachsweep.spec import parse_spec
from teachsweep.verdict import verdict


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
    point, low, high, label = interval_of(one_seed, "teacher/best_val_acc")[:4]
    assert (point, label) == (0.8, "Wilson score 95% over 100 validation examples")
    assert (low, high) == pytest.approx((0.7112, 0.8666), abs=1e-4)
    assert interval_of(one_seed, "teacher/val_ppl") is None  # a perplexity is not a proportion of examples
    seeds = {"simulability/test@seed0": 0.8, "simulability/test@seed1": 0.9, "simulability/test@seed2": 0.85}
    point, low, high, label = interval_of(seeds, "simulability/test")[:4]
    # mean 0.85, sd 0.05, t(0.975, 2) = 4.3027: half-width 4.3027 * 0.05 / sqrt(3) = 0.1242
    assert label == "Student-t 95% over 3 seeds (test split)" and point == pytest.approx(0.85)
    assert (low, high) == pytest.approx((0.7258, 0.9742), abs=1e-4)


SPEC = "name: v\njob: lot\nconfig: {task: digits, teacher: cnn}\nspace: {alpha: {type: uniform, low: 0.1, high: 1}}\n"


def row(trial_id, accuracy, n=300, **params):
    return {
        "trial_id": trial_id,
        "label": params.get("arm", "lot"),
        "status": "OK",
        "params": params,
        "metrics": {"teacher/best_val_acc": accuracy, "examples/val": float(n)},
    }


def test_the_verdict_says_when_the_best_is_within_noise():
    spec = parse_spec(SPEC)
    rows = [
        row("a", 0.70, alpha=0.1),
        row("b", 0.69, alpha=0.5),
        row("c", 0.50, alpha=0.9),
        row("base", 0.68, arm="teacher_only"),
    ]
    lines = verdict(spec, rows)
    assert lines[0].startswith(
        "best on teacher/best_val_acc (max; picked on the validation split): trial a [lot] 0.7 ["
    )
    assert "Wilson score 95% over 300 validation examples" in lines[0]
    # 0.70 vs 0.69 on 300 examples each: within noise; 0.70 vs 0.50: not
    assert lines[1].startswith("1 of 2 other trials are within noise of the best") and MOVER_METHOD in lines[1]
    assert lines[2].startswith("vs teacher_only: +0.02 [") and "within noise" in lines[2]

    far = [row("a", 0.95, n=5000, alpha=0.1), row("b", 0.50, n=5000, alpha=0.5)]
    assert verdict(spec, far)[1].startswith("the best is distinguishable from all 1 other trials")


def test_the_best_entry_every_reader_shares_is_the_trial_the_verdict_names():
    """The runner's best.json, `status`, `export` and `sweep:<name>/best` take `best_of_rows`: never a teacher-only
    arm that beats every LoT trial, and a multi-seed trial by its seeds' mean rather than by one value."""
    from teachsweep.ranking import best_of_rows

    spec = parse_spec(SPEC)
    seeds = lambda values: {f"teacher/best_val_acc@seed{s}": v for s, v in enumerate(values)}  # noqa: E731
    rows = [
        row("base", 0.99, arm="teacher_only"),
        row("a", 0.70, alpha=0.1) | {"mlflow_run_id": "ra"},
        {
            "trial_id": "b",
            "label": "lot",
            "status": "OK",
            "params": {"alpha": 0.5},
            "mlflow_run_id": "rb",
            "metrics": seeds([0.60, 0.60, 0.75]) | {"teacher/best_val_acc": 0.75},
        },
    ]
    rows[0]["mlflow_run_id"] = "rbase"
    best = best_of_rows(spec, rows)
    assert verdict(spec, rows)[0].split(": trial ")[1].startswith("a [lot]")
    assert best == [
        {
            "params": {"alpha": 0.1},
            "values": {"teacher/best_val_acc": 0.70},
            "trial_id": "a",
            "label": "lot",
            "mlflow_run_id": "ra",
        }
    ]
    only_baselines = best_of_rows(spec, rows[:1])
    assert only_baselines[0]["trial_id"] == "base"  # a baseline is the best when every trial is one


def test_the_verdict_pairs_by_seed_when_trials_share_seeds():
    spec = parse_spec(SPEC)
    seeds = lambda values: {f"teacher/best_val_acc@seed{s}": v for s, v in enumerate(values)}  # noqa: E731
    rows = [
        {
            "trial_id": "a",
            "label": "lot",
            "status": "OK",
            "params": {"alpha": 0.1},
            "metrics": seeds([0.80, 0.82, 0.84]),
        },
        {
            "trial_id": "base",
            "label": "teacher_only",
            "status": "OK",
            "params": {"arm": "teacher_only"},
            "metrics": seeds([0.70, 0.71, 0.73]),
        },
    ]
    lines = verdict(spec, rows)
    # paired differences 0.10, 0.11, 0.11: mean 0.1067, sd 0.00577, half-width 4.3027 * 0.00577 / sqrt(3) = 0.01434
    assert re.search(r"vs teacher_only: \+0\.1067 \[\+0\.09232, \+0\.121\] \(distinguishable", lines[1]), lines[1]
    assert PAIRED_METHOD in lines[1]


def test_runs_log_each_accuracy_with_its_wilson_interval():
    logged = with_intervals(
        {
            "teacher/val_acc": 0.8,
            "examples/val": 100.0,
            "teacher/val_ppl": 3.0,
            "simulability/test": 0.9,
            "simulability/test_ci_low": 0.85,
        }
    )
    assert (logged["teacher/val_acc_wilson_low"], logged["teacher/val_acc_wilson_high"]) == pytest.approx(
        (0.7112, 0.8666), abs=1e-4
    )
    assert "teacher/val_ppl_wilson_low" not in logged and "simulability/test_wilson_low" not in logged  # own kept


# ------------------------------------------------------------------------- what each interval says it is


def test_an_interval_read_back_from_mlflow_names_the_method_and_split_it_was_computed_on():
    logged = with_intervals(
        {"teacher/best_val_acc": 0.73, "examples/val": 300.0, "teacher/test_acc": 0.78, "examples/test": 300.0}
    )
    wilson = wilson_interval(0.73, 300)
    assert wilson == pytest.approx((0.6771, 0.7771), abs=1e-4)
    point, low, high, label = interval_of(logged, "teacher/best_val_acc")[:4]
    assert (point, label) == (0.73, "Wilson score 95% over 300 validation examples")
    assert (low, high) == pytest.approx(wilson)
    assert interval_of(logged, "teacher/test_acc")[3] == "Wilson score 95% over 300 test examples"
    older = {
        "teacher/best_val_acc": 0.73,
        "examples/val": 300.0,
        "teacher/best_val_acc_ci_low": wilson[0],
        "teacher/best_val_acc_ci_high": wilson[1],
    }
    assert interval_of(older, "teacher/best_val_acc")[3] == "Wilson score 95% over 300 validation examples"
    smat = {"simulability/test": 0.9, "simulability/test_ci_low": 0.85, "simulability/test_ci_high": 0.95}
    assert interval_of(smat, "simulability/test")[1:4] == (0.85, 0.95, "bootstrap 95% over test points")
    seeds = {f"simulability/test@seed{s}": v for s, v in enumerate([0.8, 0.9, 0.85])}
    assert interval_of(seeds, "simulability/test")[3] == "Student-t 95% over 3 seeds (test split)"


TINY_JOBS = {
    "lot": {"task": "digits", "teacher": "cnn:8", "epochs": 1, "steps_per_epoch": 2, "max_eval_examples": 64},
    "teacher": {"task": "digits", "model": "cnn:8", "epochs": 1, "steps_per_epoch": 2, "max_eval_examples": 64},
    "lot_rl": {
        "task": "gym:CartPole-v1",
        "num_envs": 2,
        "num_steps": 32,
        "num_minibatches": 2,
        "steps_per_epoch": 64,
        "epochs": 1,
        "eval_episodes": 2,
        "device": "cpu",
    },
    "scaffold": {
        "teacher": {
            "task": "rotten_tomatoes",
            "model": "tiny-bert",
            "lr": 1e-3,
            "epochs": 1,
            "steps_per_epoch": 3,
            "max_eval_examples": 32,
            "max_length": 24,
            "max_train_examples": 64,
        },
        "explainer": "none",
        "num_train_examples": 16,
        "batch_size": 8,
        "max_epochs": 1,
        "max_eval_examples": 32,
        "max_length": 24,
    },
}


@pytest.mark.parametrize("job", sorted(TINY_JOBS))
def test_each_jobs_intervals_in_mlflow_are_labelled_with_what_was_computed(job, tmp_path, monkeypatch):
    """Each job trains for real and logs through the trial reporter into a real MLflow store; read back, its
    objective and scores of record carry the interval that was computed, under the name of how."""
    from teachsweep import tracking
    from teachsweep.jobs import JOBS

    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(tracking.ensure_experiment(client, job)).info.run_id
    final = JOBS[job].train(TINY_JOBS[job], tracking.TrialReporter(client, run_id, to_tune=False))
    logged = client.get_run(run_id).data.metrics
    for metric in [JOBS[job].objective[0], *JOBS[job].scores]:
        if metric not in final:
            continue
        interval = interval_of(logged, metric)
        split = "test" if metric.rsplit("/", 1)[-1].startswith("test") else "validation"
        if job in ("lot", "teacher") and "_acc" in metric:  # accuracies: Wilson over the examples of their split
            count = int(final[f"examples/{'val' if split == 'validation' else 'test'}"])
            assert interval[3] == f"Wilson score 95% over {count} {split} examples", metric
            assert interval[1:3] == pytest.approx(wilson_interval(final[metric], count)), metric
        elif job == "scaffold" and metric == "simulability/test":  # its own bootstrap over the test points
            assert interval[1:4] == (
                final["simulability/test_ci_low"],
                final["simulability/test_ci_high"],
                "bootstrap 95% over test points",
            )
        else:  # SMaT's validation simulability, RL returns, step counts: one seed, no interval
            assert interval is None, (metric, interval)


def held_out_row(trial_id, val, test, arm=None, n=300, **params):
    metrics = {
        "teacher/best_val_acc": val,
        "teacher/test_acc": test,
        "examples/val": float(n),
        "examples/test": float(n),
    }
    return {
        "trial_id": trial_id,
        "label": arm or "lot",
        "status": "OK",
        "params": params | ({"arm": arm} if arm else {}),
        "metrics": metrics,
    }


def test_the_verdict_shows_the_held_out_score_of_record_beside_the_validation_pick():
    """The winner's curse: picked as the best of several on validation, it is not better on test."""
    spec = parse_spec(SPEC)
    rows = [
        held_out_row("a", 0.73, 0.78, alpha=0.1),
        held_out_row("b", 0.72, 0.79, alpha=0.5),
        held_out_row("base", 0.7067, 0.7933, arm="teacher_only"),
    ]
    lines = verdict(spec, rows)
    assert lines[0].startswith("best on teacher/best_val_acc (max; picked on the validation split): trial a [lot]")
    assert "Wilson score 95% over 300 validation examples" in lines[0]
    held = lines.index("held out, not used to pick the trial: teacher/test_acc")
    low, high = wilson_interval(0.78, 300)
    assert lines[held + 1] == f"  best 0.78 [{low:.4g}, {high:.4g}] (Wilson score 95% over 300 test examples)"
    assert re.fullmatch(
        r"  vs teacher_only 0\.7933: -0\.0133 \[-0\.0\d+, \+0\.0\d+\] \(within noise\)", lines[held + 2]
    ), lines[held + 2]
    assert all(len(line) <= 100 for line in lines[held:])


def test_the_report_keeps_the_verdicts_nesting_as_indentation():
    """HTML collapses leading spaces: the held-out lines under their heading must stay visibly nested."""
    from teachsweep.report import verdict_items

    spec = parse_spec(SPEC)
    rows = [held_out_row("a", 0.73, 0.78, alpha=0.1), held_out_row("base", 0.7067, 0.7933, arm="teacher_only")]
    items = re.findall(r'<li style="margin-left:([\d.]+)em">([^<]*)</li>', verdict_items(verdict(spec, rows)))
    depth = {text.split(" ")[0] + " " + text.split(" ")[1]: float(margin) for margin, text in items}
    assert depth["held out,"] == 0 and depth["best 0.78"] > 0 and depth["vs teacher_only"] > 0, items
    assert len(items) == len(verdict(spec, rows))


def test_an_rl_verdict_says_that_its_score_of_record_also_picked_the_trial():
    spec = parse_spec(
        "name: rl\njob: lot_rl\nconfig: {num_envs: 2}\nspace: {alpha: {type: uniform, low: 0.1, high: 1}}\n"
    )
    rows = [
        {"trial_id": t, "label": "lot", "status": "OK", "params": {"alpha": a}, "metrics": {"teacher/eval_return": r}}
        for t, a, r in (("a", 0.1, 180.0), ("b", 0.5, 120.0))
    ]
    lines = verdict(spec, rows)
    assert (
        lines[0] == "best on teacher/eval_return (max; picked on greedy evaluation episodes): trial a [lot] 180 "
        "(no interval)"
    )
    assert "teacher/eval_return is also the score of record: nothing held out checks the pick" in lines


SMAT_GRID = """
name: smat
job: scaffold
config: {num_train_examples: 16}
variants: {none: {explainer: none}, smat: {explainer: smat}}
seeds: [0, 1, 2]
"""


def smat_rows() -> list[dict]:
    def seeds(best_val, test):
        return {
            f"simulability/{m}@seed{s}": v
            for m, values in (("best_val", best_val), ("test", test))
            for s, v in enumerate(values)
        }

    return [
        {
            "trial_id": "none",
            "label": "none",
            "status": "OK",
            "params": {"explainer": "none", "variant": "none"},
            "metrics": seeds([0.80, 0.82, 0.81], [0.78, 0.80, 0.79]),
        },
        {
            "trial_id": "smat",
            "label": "smat",
            "status": "OK",
            "params": {"explainer": "smat", "variant": "smat"},
            "metrics": seeds([0.85, 0.86, 0.84], [0.79, 0.80, 0.80]),
        },
    ]


def test_a_smat_verdict_compares_the_best_explainer_with_none_on_validation_and_on_test():
    lines = verdict(parse_spec(SMAT_GRID), smat_rows())
    assert lines[0].startswith("best on simulability/best_val (max; picked on the validation split")
    assert any(line.startswith("vs none: +0.04 [") and PAIRED_METHOD in line for line in lines), lines
    held = lines.index("held out, not used to pick the trial: simulability/test")
    assert (
        lines[held + 1].startswith("  best 0.7967 [") and "Student-t 95% over 3 seeds (test split)" in lines[held + 1]
    )
    assert lines[held + 2].startswith("  vs none 0.79: +0.006667 [")


def test_a_smat_verdict_says_its_explainer_is_meta_trained_on_the_validation_split():
    line = verdict(parse_spec(SMAT_GRID), smat_rows())[0]
    assert "meta-trained" in line and "validation" in line


# ------------------------------------------------------------------------- the report's figures and tables

LOT_SEARCH = """
name: polish
job: lot
config: {task: digits, teacher: cnn}
space:
  alpha: {type: loguniform, low: 0.1, high: 1.0}
  student_steps: {type: int, low: 1, high: 2}
"""


def polish_rows() -> list[dict]:
    """Six LoT trials, three at each N, with alphas of full float precision, and a teacher-only arm."""
    cases = [
        (0.31622776601683794, 1, 0.52),
        (0.1234567891234567, 1, 0.61),
        (0.7777777777777777, 1, 0.70),
        (0.2, 2, 0.80),
        (0.5, 2, 0.88),
        (0.9, 2, 0.95),
    ]
    rows = [row(f"t{k}", acc, alpha=a, student_steps=n, arm="lot") for k, (a, n, acc) in enumerate(cases)]
    return rows + [row("base", 0.6, arm="teacher_only")]


def polish_sweep():
    from types import SimpleNamespace

    return SimpleNamespace(spec=parse_spec(LOT_SEARCH))


def drawn(monkeypatch) -> dict:
    """{title: the matplotlib figure} of each report figure made while the test runs (the report keeps PNGs only)."""
    from teachsweep import report

    figures, original = {}, report.Figure.__init__

    def keep(self, title, fig, caption):
        figures[title] = fig
        original(self, title, fig, caption)

    monkeypatch.setattr(report.Figure, "__init__", keep)
    return figures


def luminance(rgba) -> float:
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def test_heatmap_labels_contrast_with_their_cells(monkeypatch):
    from matplotlib.colors import to_rgba

    from teachsweep.report import alpha_n_map

    figures = drawn(monkeypatch)
    (figure,) = alpha_n_map(polish_sweep(), polish_rows())
    ax = figures[figure.title].axes[0]
    image = ax.images[0]
    grid = image.get_array()
    contrasts = []
    for text in ax.texts:
        i, j = (round(c) for c in reversed(text.get_position()))
        cell, label = luminance(image.cmap(image.norm(grid[i, j]))), luminance(to_rgba(text.get_color()))
        contrasts.append((max(cell, label) + 0.05) / (min(cell, label) + 0.05))
    assert len(contrasts) >= 4 and min(contrasts) >= 4.5, contrasts  # WCAG AA for text
    assert "measured on 300 validation examples" in figure.caption


def test_points_at_the_same_n_are_spread_and_captions_count_the_examples(monkeypatch):
    from teachsweep.report import objective_vs_parameters

    drawings = drawn(monkeypatch)
    figures = {f.title: f for f in objective_vs_parameters(polish_sweep(), polish_rows())}
    xs = list(drawings["teacher/best_val_acc against student_steps"].axes[0].containers[0].lines[0].get_xdata())
    assert len(set(xs)) == 6, xs  # three trials at each N, none on top of another
    assert sorted(round(x) for x in xs) == [1, 1, 1, 2, 2, 2] and all(abs(x - round(x)) <= 0.15 + 1e-9 for x in xs)
    by_alpha = drawings["teacher/best_val_acc against alpha"].axes[0].containers[0].lines[0].get_xdata()
    assert list(by_alpha)[0] == 0.31622776601683794  # a continuous parameter is not moved
    for figure in figures.values():
        assert "measured on 300 validation examples" in figure.caption, figure.caption


def test_the_report_tables_print_numbers_to_4_digits_and_intervals_in_brackets():
    from teachsweep.report import trials_table

    page = trials_table(polish_sweep(), polish_rows())
    cells = re.findall(r"<td>(.*?)</td>", page)
    assert not [c for c in cells if re.search(r"\d\.\d{5,}", c)], cells  # alpha 0.3162, not 0.31622776601683794
    assert "0.3162" in cells and "0.1235" in cells
    intervals = [c for c in cells if c.startswith(("[", "("))]
    assert intervals and all(re.fullmatch(r"\[0\.\d{1,4}, 0\.\d{1,4}\]", c) for c in intervals), intervals
    line = verdict(polish_sweep().spec, polish_rows())[0]
    assert re.search(r"trial t5 \[lot\] 0\.95 \[0\.\d+, 0\.\d+\] \(Wilson score 95% over 300 validation", line), line


def test_the_held_out_score_is_that_of_the_model_the_trial_kept_and_names_its_interval():
    """A LoT trial keeps its best-validation teacher: the held-out line reads the test score at that epoch, not
    the last epoch's, and says how the difference's interval was computed."""
    spec = parse_spec(SPEC)
    rows = [held_out_row("a", 0.73, 0.70, alpha=0.1), held_out_row("base", 0.70, 0.75, arm="teacher_only")]
    rows[0]["metrics"]["teacher/test_acc_at_best_val"] = 0.78
    rows[1]["metrics"]["teacher/test_acc_at_best_val"] = 0.76
    lines = verdict(spec, rows)
    held = lines.index("held out, not used to pick the trial: teacher/test_acc_at_best_val")
    assert lines[held + 2].startswith("  vs teacher_only 0.76: +0.02")
    assert lines[held + 3].startswith("    (difference: ") and len(lines[held + 3]) <= 100
