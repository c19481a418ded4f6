"""One small end-to-end LoT sweep per domain (images, language modelling, text) through real Ray, Optuna and
MLflow: a grid of variants with teacher-only arms at matched model-steps, two seeds each, paired comparisons."""

import math

import pytest
from mlflow.tracking import MlflowClient

from teachsweep.spec import parse_spec
from teachsweep.sweep import run_sweep

pytestmark = pytest.mark.integration

SPEC = """
name: domains
job: lot
config: {{epochs: 2, steps_per_epoch: 2, batch_size: 8, alpha: 0.5, student_steps: 2, temperature: 1.5}}
variants:
  images: {{task: digits, teacher: "vit:1", student: "cnn:8", augment_pad: 1, max_eval_examples: 32}}
  lm: {{task: bbc_news_lm, teacher: "lstm:1", student: "gpt2:1", bptt: 8, max_eval_examples: 400, optimizer: sgd, lr: 1.0}}
  text: {{task: rotten_tomatoes, teacher: tiny-bert, num_students: 2, student_weights: [0.7, 0.3], max_length: 24, max_eval_examples: 32, max_train_examples: 128}}
objectives: [{{metric: teacher/best_val_acc, mode: max}}]
seeds: [0, 1]
baseline: {{budget: model_steps}}
max_concurrent_trials: 4
results_dir: {results}
"""


def test_one_sweep_per_domain_with_matched_baselines(ray_session, tmp_path):
    text = SPEC.format(results=tmp_path / "results")
    outcome = run_sweep(parse_spec(text), text)
    assert len(outcome.trials) == 3 * 2 * 2 and all(row["status"] == "OK" for row in outcome.trials)
    rows = {(row["label"], row["params"]["seed"]): row["metrics"] for row in outcome.trials}

    images = rows[("images-lot", 0)]
    assert 0.0 <= images["teacher/test_acc"] <= 1.0 and "student/test_acc" in images
    lm = rows[("lm-lot", 1)]
    assert lm["teacher/test_ppl"] > 1.0 and math.isfinite(lm["student/val_ppl"])
    text_lot = rows[("text-lot", 0)]
    assert {"student0/val_acc", "student1/val_acc"} <= set(text_lot)  # K = 2 students
    # Matched model-steps: the teacher-only arm trains 1 + N*K times as many teacher steps.
    assert rows[("text-teacher_only-N2", 0)]["steps/teacher"] == text_lot["steps/model"] == 4 * (1 + 2 * 2)
    assert rows[("images-teacher_only-N2", 0)]["steps/teacher"] == images["steps/model"] == 4 * (1 + 2)

    compared = {(c["variant"], c["metric"]): c for c in outcome.comparisons}
    assert compared[("lm", "teacher/test_ppl")]["n_seeds"] == 2
    images_acc = compared[("images", "teacher/test_acc")]
    seeds = [
        rows[("images-lot", s)]["teacher/test_acc"] - rows[("images-teacher_only-N2", s)]["teacher/test_acc"]
        for s in (0, 1)
    ]
    assert images_acc["diff_mean"] == pytest.approx(sum(seeds) / 2)
    assert images_acc["ci_low"] <= images_acc["diff_mean"] <= images_acc["ci_high"]

    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert any(k.startswith("compare/lm/") and k.endswith("teacher/test_ppl/diff_mean") for k in parent.data.metrics)
