"""LoT's teacher-only arms: planned once per distinct config, and found again for every LoT trial they stand for
(by their recorded budget and N, never by a label), with a sentence for each comparison that cannot be made."""

import pytest
from mlflow.tracking import MlflowClient

from teachsweep.jobs import JOBS, ArmPlan, lot, lot_rl
from teachsweep.plan import fixed_trials
from teachsweep.spec import parse_spec
from teachsweep.sweep import run_sweep

SEARCH = """
name: arms
job: {job}
config: {config}
space: {{alpha: {{type: uniform, low: 0.1, high: 1.0}}}}
seeds: [0, 1]
baseline: {{budget: [teacher_steps, model_steps]}}
"""
LOT_CONFIG = '{task: digits, teacher: "cnn:8", epochs: 1, steps_per_epoch: 2}'
RL_CONFIG = "{task: gym:CartPole-v1, num_envs: 2, num_steps: 32, num_minibatches: 2, steps_per_epoch: 128}"


def seeded(values: dict[str, list[float]]) -> dict[str, float]:
    return {f"{metric}@seed{seed}": v for metric, per_seed in values.items() for seed, v in enumerate(per_seed)}


def planned_row(spec, fixed: dict, accuracy: list[float]) -> dict:
    """A finished row as the sweep builds it from Tune: the spec's config with the fixed trial's overrides."""
    overrides = {k: v for k, v in fixed.items() if k != "label"}
    return {
        "trial_id": fixed["label"],
        "label": fixed["label"],
        "status": "OK",
        "params": {**spec.config, **overrides},
        "metrics": seeded({"teacher/test_acc": accuracy}),
    }


@pytest.mark.parametrize(("job", "config"), [("lot", LOT_CONFIG), ("lot_rl", RL_CONFIG)])
def test_the_model_steps_arm_is_found_when_n_is_neither_searched_nor_a_variant(job, config):
    """N is the config's default: the arm is planned for it and the LoT trial, which records no N, is compared."""
    spec = parse_spec(SEARCH.format(job=job, config=config))
    arms = fixed_trials(spec)
    default_n = JOBS[job].config_class().student_steps
    assert sorted(a["label"] for a in arms) == ["teacher_only", f"teacher_only-N{default_n}"]
    rows = [planned_row(spec, arm, [0.70, 0.72]) for arm in arms]
    searched = {
        "trial_id": "t1",
        "label": "lot",
        "status": "OK",
        "params": {**spec.config, "alpha": 0.4},
        "metrics": seeded({"teacher/test_acc": [0.75, 0.78]}),
    }
    compared = JOBS[job].compare([*rows, searched], ["teacher/test_acc"])
    assert sorted((c["budget"], c["baseline_label"]) for c in compared) == [
        ("model_steps", f"teacher_only-N{default_n}"),
        ("teacher_steps", "teacher_only"),
    ]
    assert all(c["diff_mean"] == pytest.approx(0.055) for c in compared)
    assert JOBS[job].uncompared([*rows, searched]) == []


def test_a_comparison_that_cannot_be_made_is_said_not_dropped():
    spec = parse_spec(SEARCH.format(job="lot", config=LOT_CONFIG))
    rows = [planned_row(spec, arm, [0.70, 0.72]) for arm in fixed_trials(spec)]
    other_n = {
        "trial_id": "t3",
        "label": "lot",
        "status": "OK",
        "params": {**spec.config, "alpha": 0.4, "student_steps": 3},
        "metrics": seeded({"teacher/test_acc": [0.75, 0.78]}),
    }
    compared = lot.compare([*rows, other_n], ["teacher/test_acc"])
    assert [c["budget"] for c in compared] == ["teacher_steps"]  # N does not change a teacher-steps arm
    (said,) = lot.uncompared([*rows, other_n])
    assert (
        said.startswith("t3 [lot]: no finished teacher-only arm at model_steps matches it") and "student_steps" in said
    )
    failed = [{**r, "status": "ERROR"} if r["label"] == "teacher_only" else r for r in rows]
    searched = {**other_n, "params": {**spec.config, "alpha": 0.4}}
    (said,) = lot.uncompared([*failed, searched])
    assert "teacher_steps" in said and "did not finish" in said


GRID = """
name: shared-arm
job: lot
config: {task: digits, teacher: "cnn:8", epochs: 1, steps_per_epoch: 2, max_eval_examples: 64, batch_size: 16}
variants:
  a03: {alpha: 0.3}
  a10: {alpha: 1.0, temperature: 2.0}
seeds: [0, 1]
baseline: {budget: [teacher_steps, model_steps]}
"""


def test_variants_that_differ_only_in_lot_fields_plan_one_arm_per_budget():
    labels = [t["label"] for t in fixed_trials(parse_spec(GRID)) if t.get("seed") == 0]
    assert labels == ["a03-lot", "teacher_only", "teacher_only-N2", "a10-lot"]
    domains = GRID.replace("a10: {alpha: 1.0, temperature: 2.0}", "a10: {alpha: 1.0, max_length: 16, task: digits}")
    domains = domains.replace("task: digits, teacher", "task: digits, max_length: 32, teacher")
    labels = [t["label"] for t in fixed_trials(parse_spec(domains)) if t.get("seed") == 0]
    assert labels == [
        "a03-lot",
        "a03-teacher_only",
        "a03-teacher_only-N2",
        "a10-lot",
        "a10-teacher_only",
        "a10-teacher_only-N2",
    ]
    three = GRID.replace("  a10:", "  a30: {alpha: 3.0, max_length: 16}\n  a10:")
    labels = [t["label"] for t in fixed_trials(parse_spec(three)) if t.get("seed") == 0]
    assert "a03+a10-teacher_only" in labels and "a30-teacher_only" in labels and len(labels) == 7


def test_rl_arms_of_variants_that_differ_in_alpha_are_planned_once():
    spec = parse_spec(f"""
name: rl-shared
job: lot_rl
config: {RL_CONFIG}
variants: {{a03: {{alpha: 0.3}}, a10: {{alpha: 1.0}}}}
baseline: {{budget: model_steps}}
""")
    assert [t["label"] for t in fixed_trials(spec)] == ["a03-lot", "teacher_only-N5", "a10-lot"]
    (arm,) = [t for t in fixed_trials(spec) if t["label"] == "teacher_only-N5"]
    assert (
        arm["budget_multiplier"]
        == lot_rl.fixed_arms(lot_rl.LoTRLConfig(), ArmPlan(["model_steps"]))[0]["budget_multiplier"]
    )


@pytest.mark.integration
def test_one_teacher_only_arm_is_trained_and_compared_with_every_variant(ray_session, tmp_path):
    text = GRID + f"max_concurrent_trials: 4\nresults_dir: {tmp_path / 'results'}\n"
    outcome = run_sweep(parse_spec(text), text)
    assert all(row["status"] == "OK" for row in outcome.trials)
    assert sorted({row["label"] for row in outcome.trials}) == ["a03-lot", "a10-lot", "teacher_only", "teacher_only-N2"]
    pairs = {
        (c["variant"], c["budget"], c["baseline_label"])
        for c in outcome.comparisons
        if c["metric"] == "teacher/test_acc"
    }
    assert pairs == {
        (v, b, label)
        for v in ("a03", "a10")
        for b, label in (("teacher_steps", "teacher_only"), ("model_steps", "teacher_only-N2"))
    }
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("shared-arm").experiment_id],
        filter_string="tags.`teachsweep.label` = 'teacher_only'",
    )
    assert len(runs) == 2 and {r.data.params["alpha"] for r in runs} == {"0.0"}  # one arm, each seed; it ran alpha 0
