"""A registered study: its endpoints are part of the spec (validated, fingerprinted), its code must be committed,
and its results are read primary first, each with a paired interval clipped to what the metric can take."""

import subprocess
from pathlib import Path

import pytest

from teachsweep import preflight, tracking
from teachsweep.endpoints import endpoint_lines, endpoint_results
from teachsweep.metrics import by_teacher, seed_summaries
from teachsweep.spec import SpecError, parse_spec

SPEC = """
name: s
job: lot
config: {{task: digits, teacher: cnn, epochs: 1}}
variants: {{a05: {{alpha: 0.5}}}}
seeds: [{seeds}]
baseline: {{budget: teacher_steps}}
study:
{study}
"""
PRIMARY = "  primary: {metric: teacher/test_acc_at_best_val, budget: teacher_steps}\n"


def spec_text(study: str = PRIMARY, seeds: int = 8) -> str:
    return SPEC.format(seeds=", ".join(str(s) for s in range(seeds)), study=study)


@pytest.mark.parametrize(
    ("study", "seeds", "said"),
    [
        (PRIMARY, 5, "seeds: a study's claims need at least 8 seeds (got 5)"),
        (PRIMARY + "  min_seeds: 4\n", 5, None),
        ("  primary: {metric: teacher/test_acc, budget: model_steps}\n", 8, "study.primary.budget: model_steps, but"),
        (
            "  primary: {metric: teacher/test_acc, budget: teacher_steps, variant: nope}\n",
            8,
            "study.primary.variant: no variant named 'nope'",
        ),
        ("  primary: {metric: teacher/test_acc}\n", 8, "study.primary.budget: job 'lot' has no reference arm"),
        (
            "  primary: {metric: teacher/test_acc, variant: a05, versus: a05}\n",
            8,
            "study.primary.versus: job 'lot' compares its arms at a budget",
        ),
        (PRIMARY + "  secondary: [{metric: x, budget: model_steps}]\n", 8, "study.secondary.0.budget"),
    ],
)
def test_a_study_is_refused_in_one_line_where_it_cannot_answer(study, seeds, said):
    if said is None:
        parse_spec(spec_text(study, seeds), "s.yaml: ")
        return
    with pytest.raises(SpecError) as refused:
        parse_spec(spec_text(study, seeds), "s.yaml: ")
    assert str(refused.value).startswith(f"s.yaml: {said}"), str(refused.value)


def test_a_study_endpoint_no_trial_reports_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setenv(preflight.ALLOW_DIRTY, "1")
    spec = parse_spec(spec_text("  primary: {metric: teacher/test_ppl, budget: teacher_steps}\n"), "s.yaml: ")
    with pytest.raises(SpecError, match="s.yaml: study.primary.metric: 'teacher/test_ppl' is never reported"):
        preflight.check_spec(spec, "s.yaml: ")


def test_the_endpoints_are_part_of_the_fingerprint():
    first = parse_spec(spec_text()).fingerprint()
    changed = parse_spec(spec_text(PRIMARY.replace("test_acc_at_best_val", "test_acc"))).fingerprint()
    assert first != changed and "study" in first
    assert "study" not in parse_spec(SPEC.split("study:")[0].format(seeds="0")).fingerprint()


def git(directory, *args: str) -> None:
    subprocess.run(["git", *args], cwd=directory, check=True, capture_output=True)


def test_a_study_from_code_with_uncommitted_changes_is_refused_unless_allowed(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    git(tmp_path, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "empty")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "code")
    monkeypatch.setattr(tracking, "CODE_DIR", tmp_path)
    assert tracking.git_dirty() is False and tracking.code_tags()["teachsweep.git_dirty"] == "false"
    spec = parse_spec(spec_text(), "s.yaml: ")
    preflight.check_spec(spec, "s.yaml: ")  # committed: runs
    (tmp_path / "code.py").write_text("x = 2\n")
    assert tracking.code_tags()["teachsweep.git_dirty"] == "true"
    with pytest.raises(SpecError, match="s.yaml: study: the code in .* has uncommitted changes"):
        preflight.check_spec(spec, "s.yaml: ")
    monkeypatch.setenv(preflight.ALLOW_DIRTY, "1")
    preflight.check_spec(spec, "s.yaml: ")
    monkeypatch.setattr(tracking, "CODE_DIR", tmp_path / "not-a-checkout")
    (tmp_path / "not-a-checkout").mkdir()
    monkeypatch.chdir(tmp_path / "not-a-checkout")
    assert tracking.git_dirty(tmp_path.parent) in (None, False, True)  # whatever holds it: no crash


def test_endpoints_read_primary_first_with_a_clipped_paired_interval_and_say_when_nothing_matched():
    study = PRIMARY + "  secondary: [{metric: student/test_acc, budget: teacher_steps}]\n"
    spec = parse_spec(spec_text(study))
    comparisons = [
        {
            "variant": "a05",
            "trial": "a05-lot",
            "baseline_label": "teacher_only",
            "budget": "teacher_steps",
            "metric": "teacher/test_acc_at_best_val",
            "diff_mean": 0.02,
            "ci_low": -1.7,
            "ci_high": 0.9,
            "p_value": 0.0078,
            "n_seeds": 8,
        },
    ]
    results = endpoint_results(spec, comparisons, [], None)
    (primary,) = results
    assert (primary.role, primary.ci_low, primary.ci_high) == ("primary", -1.0, 0.9)
    assert "clipped to the metric's bounds" in primary.method
    lines = endpoint_lines(spec, results)
    assert lines[0].startswith("primary endpoint teacher/test_acc_at_best_val at teacher steps, a05-lot − teacher_only")
    assert ": +0.02 [-1, +0.9], p 0.0078 (8 seeds; paired Student-t 95%" in lines[0], lines[0]
    assert (
        lines[1]
        == "secondary endpoint student/test_acc at teacher steps: nothing to compare (no finished paired trials)"
    )


def test_an_accuracy_mean_over_seeds_keeps_its_interval_inside_0_and_1():
    rows = [
        {
            "label": "x",
            "status": "OK",
            "params": {},
            "metrics": {"teacher/test_acc@seed0": 0.99, "teacher/test_acc@seed1": 0.2},
        }
    ]
    (summary,) = seed_summaries(rows, ["teacher/test_acc"])
    assert 0.0 <= summary["ci_low"] and summary["ci_high"] <= 1.0 and "clipped to [0, 1]" in summary["method"]


def test_a_study_of_a_search_is_refused():
    text = spec_text().replace("variants: {a05: {alpha: 0.5}}", "space: {alpha: {type: uniform, low: 0.1, high: 1.0}}")
    with pytest.raises(SpecError, match="s.yaml: study: a study compares the arms of a grid"):
        parse_spec(text, "s.yaml: ")


def test_a_study_cannot_be_added_to_a_sweep_that_ran_without_one(tmp_path):
    import json

    from teachsweep.preflight import check_stores

    with_study = parse_spec(spec_text())
    without = parse_spec(spec_text().split("study:")[0])
    fingerprint = tmp_path / "spec.json"
    fingerprint.write_text(json.dumps(without.fingerprint()))
    with pytest.raises(SpecError, match="exists with a different spec .*study: None ->"):
        check_stores(with_study, tmp_path / "results", fingerprint, started=True)


SCAFFOLD_SPEC = """
name: s
job: scaffold
config: {{teacher: {{task: rotten_tomatoes, model: "minilm:2"}}}}
variants: {{none: {{explainer: none}}, attention: {{explainer: attention}}, smat: {{explainer: smat}}}}
seeds: [0, 1, 2, 3, 4, 5, 6, 7]
study:
  primary: {{metric: simulability/test, variant: smat{versus}}}
"""


@pytest.mark.parametrize(
    ("versus", "said"),
    [
        (", versus: nope", "study.primary.versus: no variant named 'nope'"),
        (", versus: smat", "study.primary.versus: 'smat' is the variant it would be compared with"),
    ],
)
def test_a_variant_compared_with_another_names_one_that_exists(versus, said):
    with pytest.raises(SpecError) as refused:
        parse_spec(SCAFFOLD_SPEC.format(versus=versus), "s.yaml: ")
    assert str(refused.value).startswith(f"s.yaml: {said}"), str(refused.value)


def test_an_endpoint_versus_another_variant_is_the_paired_difference_with_that_variant_not_the_reference_arm():
    spec = parse_spec(SCAFFOLD_SPEC.format(versus=", versus: attention"))
    assert spec.endpoint_references == ["attention"]
    by_label = {"none": 0.80, "attention": 0.88, "smat": 0.86}
    jitter = [0.01, -0.01, 0.02, 0.0, -0.02, 0.01, 0.0, -0.01]
    rows = [
        {
            "label": label,
            "status": "OK",
            "params": {},
            "metrics": {f"simulability/test@seed{s}": level + jitter[s] * (label == "smat") for s in range(8)},
        }
        for label, level in by_label.items()
    ]
    summaries = seed_summaries(rows, ["simulability/test"], "none", spec.endpoint_references)
    (primary,) = endpoint_results(spec, [], summaries, "none")
    assert primary.compared == "smat − attention"
    assert primary.diff == pytest.approx(-0.02)  # not smat − none (+0.06)
    assert primary.ci_low < -0.02 < primary.ci_high and primary.n_seeds == 8
    (line,) = endpoint_lines(spec, [primary])
    assert line.startswith("primary endpoint simulability/test of smat, smat − attention: -0.02 ["), line


def test_an_endpoint_counts_the_seeds_both_variants_ran_not_the_variants_own():
    """attention250 lost three seeds: the paired difference is over five, and the line says fewer than registered."""
    spec = parse_spec(SCAFFOLD_SPEC.format(versus=", versus: attention"))
    rows = [
        {
            "label": label,
            "status": "OK",
            "params": {},
            "metrics": {f"simulability/test@seed{s}": 0.8 + 0.01 * s for s in seeds},
        }
        for label, seeds in (("smat", range(8)), ("attention", range(5)), ("none", range(8)))
    ]
    summaries = seed_summaries(rows, ["simulability/test"], "none", spec.endpoint_references)
    (primary,) = endpoint_results(spec, [], summaries, "none")
    assert primary.n_seeds == 5
    (line,) = endpoint_lines(spec, [primary])
    assert "5 of 8 seeds; fewer than the 8 registered" in line, line


STUDENTS_SPEC = """
name: students
job: scaffold
config: {{teacher: "sweep:teachers/each"}}
variants: {{none: {{explainer: none}}, attention: {{explainer: attention}}}}
study:
  primary: {{metric: simulability/test, variant: attention, teacher: alpha1-lot{extra}}}
"""


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (", variant: nope", "study.primary.variant: no variant named 'nope'"),
        (", versus: none", "study.primary.versus: an endpoint by teacher arm compares the students of two"),
        (", budget: teacher_steps", "study.primary.budget: an endpoint by teacher arm"),
    ],
)
def test_an_endpoint_by_teacher_arm_is_refused_in_one_line_where_it_cannot_apply(extra, said):
    text = STUDENTS_SPEC.format(extra=extra).replace("variant: attention, teacher", "teacher")
    with pytest.raises(SpecError) as refused:
        parse_spec(text, "s.yaml: ")
    assert str(refused.value).startswith(f"s.yaml: {said}"), str(refused.value)
    lot = spec_text("  primary: {metric: teacher/test_acc, teacher: alpha1-lot}\n")
    with pytest.raises(SpecError, match="study.primary.teacher: job 'lot' takes no teacher"):
        parse_spec(lot)
    not_a_score = STUDENTS_SPEC.format(extra="").replace("metric: simulability/test", "metric: simulability/best_val")
    with pytest.raises(SpecError, match="study.primary.metric: an endpoint by teacher arm compares the students'"):
        parse_spec(not_a_score)
    empty = STUDENTS_SPEC.format(extra="").replace("teacher: alpha1-lot", "teacher: ''")
    with pytest.raises(SpecError, match="study.primary.teacher: String should have at least 1 character"):
        parse_spec(empty)
    one_teacher = STUDENTS_SPEC.format(extra="").replace("sweep:teachers/each", "sweep:teachers/best")
    with pytest.raises(SpecError, match="study.primary.teacher: its students take no `sweep:<name>/each` teachers"):
        parse_spec(one_teacher)


def test_students_by_the_arm_of_their_teacher_are_paired_by_teacher_seed():
    """Students of 8 LoT and 7 teacher-only teachers (one student a teacher and explainer): the endpoint is the
    attention students' difference, paired by the teachers' seed over the 7 seeds both arms ran, whatever seeds the
    students' sweep lists."""
    spec = parse_spec(STUDENTS_SPEC.format(extra=""))  # one student seed: the teachers' seeds are what pair
    assert spec.compares_teachers and spec.seeds == [0]
    baseline, arm = "teacher_only-teacher_only", "alpha1-lot"
    teachers = {f"{baseline}{seed}": {"label": baseline, "seed": seed, "scores": {}} for seed in range(7)}
    teachers |= {f"{arm}{seed}": {"label": arm, "seed": seed, "scores": {}} for seed in range(8)}

    def simulability(label: str, variant: str, seed: int) -> float:
        # seeds differ by 7 points, arms by 3 (attention) or 1 (none) points: only pairing sees the 3 clearly
        level = 0.80 + 0.01 * seed + (0.05 if variant == "attention" else 0.0)
        return level - ((0.03 + 0.001 * (seed % 2)) if variant == "attention" else 0.01) * (label == arm)

    students = [
        {
            "teacher": trial,
            "variant": variant,
            "scores": {"simulability/test": simulability(t["label"], variant, t["seed"])},
        }
        for trial, t in teachers.items()
        for variant in ("none", "attention")
    ]
    rows = by_teacher(teachers, students, baseline)
    (primary,) = endpoint_results(spec, [], [], "none", rows)
    assert primary.compared == f"attention students of {arm} − of {baseline} teachers"
    assert primary.diff == pytest.approx(-0.03 - 0.001 * 3 / 7) and primary.n_seeds == 7  # seeds 0-6, not seed 7
    assert primary.ci_low < primary.diff < primary.ci_high and primary.ci_high - primary.ci_low < 0.002  # paired
    (line,) = endpoint_lines(spec, [primary])
    assert "(7 teacher seeds; fewer than the 8 registered" in line, line
    assert endpoint_lines(spec, endpoint_results(spec, [], [], "none", [])) == [
        "primary endpoint simulability/test of attention taught by alpha1-lot minus the baseline teachers' "
        "students: nothing to compare (no students of that teacher arm and its baseline)"
    ]


@pytest.mark.parametrize("rows", sorted(Path(__file__).parent.parent.glob("docs/results/study_*.json")), ids=str)
def test_each_committed_study_figure_pairs_the_seeds_its_endpoints_did(rows, tmp_path):
    """A study's figure is drawn from its committed rows; each endpoint's recorded difference is the mean over the
    seeds both arms ran of their paired differences in those rows, and the figure joins exactly those seeds."""
    import importlib.util
    import json

    script = Path(__file__).parent.parent / "scripts" / "study_figures.py"
    module_spec = importlib.util.spec_from_file_location("study_figures", script)
    study_figures = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(study_figures)
    table = json.loads(rows.read_text())
    assert table["endpoints"] and table["endpoints"][0]["role"] == "primary"
    for endpoint in table["endpoints"]:
        metric = study_figures.metric_of(endpoint["endpoint"])
        if endpoint.get("teacher"):  # by teacher arm: the recorded by-teacher row it was read from
            (row,) = [
                r
                for r in table["by_teacher"]
                if (r["teacher"], r["variant"], r["metric"]) == (endpoint["teacher"], endpoint["students"], metric)
            ]
            assert row["vs_reference_n_seeds"] == endpoint["n_seeds"]
            assert row["vs_reference_diff_mean"] == pytest.approx(endpoint["diff"], rel=1e-9, abs=1e-12)
            continue
        first, second = endpoint["compared"].split(" − ")
        a, b = study_figures.per_seed(table, first, metric), study_figures.per_seed(table, second, metric)
        seeds = set(a) & set(b)
        assert len(seeds) == endpoint["n_seeds"]
        assert sum(a[s] - b[s] for s in seeds) / len(seeds) == pytest.approx(endpoint["diff"], rel=1e-9, abs=1e-12)
    assert study_figures.draw(table, tmp_path / "figure.png").stat().st_size > 10_000
