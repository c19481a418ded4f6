"""A real sweep through real Ray Tune, a real Optuna RDB study and a real MLflow store."""

import re
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from small_jobs import lot_search_spec

from teachsweep.metrics import wilson_interval
from teachsweep.results import open_sweep
from teachsweep.spec import parse_spec
from teachsweep.sweep import paths_for, run_sweep
from teachsweep.ui import page_urls as ui_urls

pytestmark = pytest.mark.integration

CONFIG = (
    "{task: rotten_tomatoes, teacher: tiny-bert, lr: 1.0e-3, epochs: 2, steps_per_epoch: 3, batch_size: 16, "
    "max_train_examples: 256, max_eval_examples: 64, max_length: 32}"
)


def spec_text(name: str, results: Path) -> str:
    return lot_search_spec(name, CONFIG, 2, 2, results)


def child_runs(client, experiment_id, parent_run_id):
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_two_trial_sweep_records_the_same_results_in_mlflow_and_optuna(ray_session, tmp_path):
    text = spec_text("itest", tmp_path / "results")
    spec = parse_spec(text)
    outcome = run_sweep(spec, text)

    assert [row["status"] for row in outcome.trials] == ["OK", "OK"]
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("itest")
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["teachsweep.role"] == "parent"
    children = child_runs(client, experiment.experiment_id, outcome.parent_run_id)
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
    for run in children:
        history = client.get_metric_history(run.info.run_id, "teacher/val_acc")
        assert [m.step for m in history] == [1, 2]  # one point per epoch
        assert float(run.data.params["alpha"]) > 0 and run.data.params["teacher"] == "tiny-bert"

    study = optuna.load_study(study_name="itest", storage=paths_for(spec).optuna_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    mlflow_values = sorted(run.data.metrics["teacher/best_val_acc"] for run in children)
    assert sorted(t.value for t in complete) == pytest.approx(mlflow_values)
    mlflow_alphas = sorted(float(run.data.params["alpha"]) for run in children)
    assert sorted(t.params["alpha"] for t in complete) == pytest.approx(mlflow_alphas)
    assert outcome.best and outcome.best[0]["values"]["teacher/best_val_acc"] == max(mlflow_values)

    # Running the same spec again restores the finished sweep: no new trials, no duplicated runs.
    again = run_sweep(spec, text)
    assert len(again.trials) == 2
    assert len(child_runs(client, experiment.experiment_id, outcome.parent_run_id)) == 2
    assert len(optuna.load_study(study_name="itest", storage=paths_for(spec).optuna_url).trials) == 2


def test_baseline_arm_and_seeds(ray_session, tmp_path):
    """A teacher-only arm at matched model-steps next to the search, each configuration over two seeds."""
    text = spec_text("seeded", tmp_path / "results").replace("num_samples: 2", "num_samples: 1")
    text = text.replace("{type: int, low: 1, high: 2}", "{type: categorical, values: [2]}")
    text += "seeds: [0, 1]\nbaseline: {budget: model_steps}\n"
    spec = parse_spec(text)
    outcome = run_sweep(spec, text)
    labels = sorted(row["label"] for row in outcome.trials)
    assert labels == ["lot", "teacher_only-N2"]
    by_label = {row["label"]: row for row in outcome.trials}
    lot, base = by_label["lot"]["metrics"], by_label["teacher_only-N2"]["metrics"]
    assert base["steps/teacher"] == lot["steps/model"] == 3 * lot["steps/teacher"]
    assert "teacher/test_acc_std" in lot

    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("seeded")
    trials = child_runs(client, experiment.experiment_id, outcome.parent_run_id)
    assert len(trials) == 2
    for trial in trials:
        seeds = child_runs(client, experiment.experiment_id, trial.info.run_id)
        assert sorted(run.data.tags["teachsweep.seed"] for run in seeds) == ["0", "1"]
        for run in seeds:  # every accuracy in MLflow carries its Wilson interval over the evaluation examples
            m = run.data.metrics
            assert (m["teacher/best_val_acc_wilson_low"], m["teacher/best_val_acc_wilson_high"]) == pytest.approx(
                wilson_interval(m["teacher/best_val_acc"], int(m["examples/val"]))
            )
    study = optuna.load_study(study_name="seeded", storage=paths_for(spec).optuna_url)
    assert len(study.trials) == 1  # the baseline arm is not a search point

    # The report: written at the end, logged to the parent run, self-contained, its numbers those of MLflow.
    page = outcome.report.read_text()
    sources = re.findall(r"(?:src|href)\s*=\s*[\"']([^\"']*)", page)
    assert sources and all(s.startswith("data:") for s in sources) and "<link" not in page  # all inline
    for title in (
        "teacher/best_val_acc against alpha",
        "Learning curves of the best trials",
        "LoT minus teacher-only, paired by seed",
        "Scores by variant, over seeds",
        "Verdict",
    ):
        assert title in page, title
    assert page.count("<img") == 5
    for trial in trials:
        assert f"<td>{trial.data.metrics['teacher/best_val_acc']:.4g}</td>" in page  # the mean over its 2 seeds
    assert "report.html" in [a.path for a in client.list_artifacts(outcome.parent_run_id)]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    urls = ui_urls(open_sweep("seeded", tmp_path / "results"))
    assert urls["trials"].startswith(f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?")
    assert "orderByAsc=false" in urls["trials"] and outcome.parent_run_id in urls["report"]
    assert urls["study"].endswith(f"/dashboard/studies/{study._study_id}")
    assert study.metric_names == ["teacher/best_val_acc"]  # what optuna-dashboard labels the objective with


def test_a_grid_sweep_run_again_is_restored_not_repeated(ray_session, tmp_path):
    text = f"""
name: grid-again
job: lot
config: {{task: digits, teacher: "cnn:8", epochs: 1, steps_per_epoch: 2, max_eval_examples: 32}}
variants: {{small: {{alpha: 0.2}}, large: {{alpha: 1.0}}}}
results_dir: {tmp_path / "results"}
"""
    spec = parse_spec(text)
    first = run_sweep(spec, text)
    again = run_sweep(spec, text)  # Tune restores the finished experiment, its searcher included
    assert sorted(r["trial_id"] for r in again.trials) == sorted(r["trial_id"] for r in first.trials)
    client = MlflowClient(again.tracking_uri)
    assert len(child_runs(client, client.get_experiment_by_name("grid-again").experiment_id, again.parent_run_id)) == 2
