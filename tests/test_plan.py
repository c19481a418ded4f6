"""Planning, on specs alone (no Ray, no MLflow): which trials a spec starts, with what labels and seeds."""

from teachsweep.plan import (
    fixed_trials,
    packs_of,
    plan_of,
    planned_configs,
    planned_count,
    searched_packs,
    structural_params,
    structure_key,
    unseeded_fixed_trials,
)
from teachsweep.spec import parse_spec

HEAD = """
name: g
job: lot
config: {task: digits, teacher: cnn, student_steps: 2}
"""

GRID = (
    HEAD
    + """variants:
  small: {alpha: 0.1}
  large: {alpha: 1.0}
seeds: [0, 1, 2]
"""
)


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


def test_packs_group_trials_by_structure_and_hold_at_most_pack_members():
    text = (
        HEAD
        + """variants:
  a01: {alpha: 0.1}
  a03: {alpha: 0.3}
  a10: {alpha: 1.0}
  n4: {alpha: 1.0, student_steps: 4}
seeds: [0, 1]
resources: {pack: 4}
"""
    )
    spec = parse_spec(text)
    trials = fixed_trials(spec)
    packs = packs_of(spec, trials)
    # alpha and the seed may differ inside a pack, N may not: the 6 trials with N = 2 fill a pack of 4 and one of 2
    assert [[(t["label"], t["seed"]) for t in pack] for pack in packs] == [
        [("a01-lot", 0), ("a03-lot", 0), ("a10-lot", 0), ("a01-lot", 1)],
        [("a03-lot", 1), ("a10-lot", 1)],
        [("n4-lot", 0), ("n4-lot", 1)],
    ]
    assert len({structure_key(spec, t) for t in packs[0] + packs[1]}) == 1
    assert structure_key(spec, packs[0][0]) != structure_key(spec, packs[2][0])


def test_a_packed_search_asks_its_samples_in_packs_and_shares_its_structural_parameters():
    text = GRID.split("variants:")[0] + (
        "space:\n  alpha: {type: loguniform, low: 0.1, high: 1.0}\n  student_steps: {type: int, low: 1, high: 3}\n"
        "num_samples: 10\nresources: {pack: 4}\n"
    )
    spec = parse_spec(text)
    assert searched_packs(spec) == [4, 4, 2]
    assert structural_params(spec) == ["student_steps"]  # alpha varies per member; N is asked once per pack
    assert searched_packs(parse_spec(GRID)) == []  # a grid searches nothing


def test_a_teacher_only_arm_is_labelled_by_the_variants_it_stands_for():
    text = (
        HEAD
        + """variants:
  a03: {alpha: 0.3}
  a10: {alpha: 1.0}
  fast: {alpha: 1.0, lr: 0.1}
baseline: {budget: teacher_steps}
"""
    )
    labels = [t["label"] for t in fixed_trials(parse_spec(text))]
    # a03 and a10 differ only in LoT's own fields: one arm stands for both; fast trains otherwise: its own arm
    assert labels == ["a03-lot", "a03+a10-teacher_only", "a10-lot", "fast-lot", "fast-teacher_only"]
    every = text.replace("  fast: {alpha: 1.0, lr: 0.1}\n", "")
    assert [t["label"] for t in fixed_trials(parse_spec(every))] == ["a03-lot", "teacher_only", "a10-lot"]


def test_a_reference_to_a_pipeline_stage_that_has_not_run_plans_one_trial_per_variant_and_opens_nothing(tmp_path):
    text = f"""
name: students
job: scaffold
config: {{teacher: "sweep:teachers/each", explainer: attention}}
variants:
  attention: {{}}
  none: {{explainer: none}}
results_dir: {tmp_path / "results"}
"""
    spec = parse_spec(text)
    planned = unseeded_fixed_trials(spec, pending={"teachers"})
    assert [t["label"] for t in planned] == ["attention", "none"]
    assert all("teacher_source" not in t for t in planned)  # fanned out only once the teachers exist
    assert not (tmp_path / "results").exists()


def test_the_plan_holds_the_fixed_trials_before_and_after_their_seeds_and_the_count():
    spec = parse_spec(GRID + "baseline: {budget: teacher_steps}\n")
    plan = plan_of(spec)
    assert plan.fixed == fixed_trials(spec) and plan.count == planned_count(spec) == len(plan.fixed) == 3 * 3
    assert [t["label"] for t in plan.unseeded] == ["small-lot", "teacher_only", "large-lot"]
    assert all("seed" not in t for t in plan.unseeded)
