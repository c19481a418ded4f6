"""Planning, on specs alone (no Ray, no MLflow): which trials a spec starts, with what labels and seeds."""

from teachsweep.plan import fixed_trials, planned_configs, planned_count
from teachsweep.spec import parse_spec

GRID = """
name: g
job: lot
config: {task: digits, teacher: cnn, student_steps: 2}
variants:
  small: {alpha: 0.1}
  large: {alpha: 1.0}
seeds: [0, 1, 2]
"""


def test_a_grid_runs_every_variant_once_per_seed_seed_major():
    trials = fixed_trials(parse_spec(GRID))
    assert [(t["label"], t["seed"]) for t in trials] == [
        ("small-lot", 0),
        ("large-lot", 0),
        ("small-lot", 1),
        ("large-lot", 1),
        ("small-lot", 2),
        ("large-lot", 2),
    ]
    assert {t["alpha"] for t in trials if t["label"] == "large-lot"} == {1.0}
    assert planned_count(parse_spec(GRID)) == 6


def test_baseline_budgets_add_one_teacher_only_arm_per_budget_shared_by_variants_that_differ_in_lot_fields():
    spec = parse_spec(GRID + "baseline: {budget: [teacher_steps, model_steps]}\n")
    labels = [t["label"] for t in fixed_trials(spec) if t["seed"] == 0]
    assert sorted(labels) == ["large-lot", "small-lot", "teacher_only", "teacher_only-N2"]  # one arm per budget
    arms = {t["label"]: t for t in fixed_trials(spec) if t["seed"] == 0}
    assert arms["teacher_only"]["arm"] == arms["teacher_only-N2"]["arm"] == "teacher_only"
    assert "variant" not in arms["teacher_only"] and arms["teacher_only"]["alpha"] == 0.0
    # the model-steps arm trains (1 + N) times the teacher steps; the teacher-steps arm as many as LoT
    assert arms["teacher_only-N2"]["budget_multiplier"] == 3.0 and "budget_multiplier" not in arms["teacher_only"]
    assert planned_count(spec) == 4 * 3


def test_a_search_plans_its_samples_beside_its_fixed_arms_and_runs_seeds_inside_each_trial():
    text = GRID.split("variants:")[0] + (
        "space: {alpha: {type: loguniform, low: 0.1, high: 1.0}}\nnum_samples: 5\nseeds: [0, 1]\n"
        "baseline: {budget: teacher_steps}\n"
    )
    spec = parse_spec(text)
    trials = fixed_trials(spec)
    assert [t["label"] for t in trials] == ["teacher_only"] and "seed" not in trials[0]
    assert planned_count(spec) == 1 + 5
    # what the preflight checks: the search's base config and each fixed trial, with where each was set
    planned = planned_configs(spec)
    assert [where for where, _, _ in planned] == ["config", "baseline"]
    assert planned[0][2] == set() and planned[1][1]["arm"] == "teacher_only" and "arm" in planned[1][2]
