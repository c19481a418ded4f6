"""Per-epoch checkpoints: a restarted LoT trial continues exactly where it stopped, and a trial whose worker
process is killed is restarted by Tune from its checkpoint into the same MLflow run."""

import threading
import time

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from reporters import CrashAfter, Resume
from small_jobs import small_scaffold_job, vit_digits_teacher

from teachsweep.jobs import lot
from teachsweep.spec import parse_spec
from teachsweep.sweep import run_sweep

JOB = {
    "task": "digits",
    "teacher": "cnn:8",
    "alpha": 0.5,
    "student_steps": 2,
    "epochs": 3,
    "steps_per_epoch": 5,
    "batch_size": 32,
    "optimizer": "sgd",
    "lr": 0.05,
    "max_eval_examples": 64,
}


def test_a_restarted_job_continues_exactly_where_it_stopped():
    uninterrupted = lot.train(JOB)
    crashed = CrashAfter(1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lot.train(JOB, crashed)
    resumed = Resume(crashed.saved)
    final = lot.train(JOB, resumed)
    assert [h["epoch"] for h in resumed.history] == [2, 3] and final["trial/resumed_from_epoch"] == 1
    for key in ("teacher/val_acc", "student/val_acc", "loss/teacher", "loss/student", "steps/teacher", "steps/model"):
        assert final[key] == pytest.approx(uninterrupted[key], rel=1e-6), key


@pytest.mark.integration
def test_a_trial_whose_worker_is_killed_resumes_into_the_same_mlflow_run(ray_session, tmp_path):
    epochs = 5
    job = JOB | {"epochs": epochs, "steps_per_epoch": 60}
    spec = {
        "name": "killed-worker",
        "job": "lot",
        "config": job,
        "variants": {"only": {}},
        "max_failures": 1,
        "results_dir": str(tmp_path / "results"),
    }
    text = yaml.safe_dump(spec, sort_keys=False)
    killed = []

    def kill_the_worker_after_its_second_checkpoint():
        # Epoch 3 logged means Tune took epoch 2's result, checkpoint included (a trial reports, then waits for
        # Tune to fetch it); epoch 2 logged alone does not: the worker logs to MLflow before it reports.
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            time.sleep(0.5)
            logged, pid = progress()
            if logged >= 3 and pid:
                psutil.Process(pid).kill()  # only this trial's process (the tag the trial sets)
                killed.append(pid)

    def progress() -> tuple[int, int | None]:
        try:
            client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
            experiment = client.get_experiment_by_name("killed-worker")
            (run,) = client.search_runs([experiment.experiment_id], "tags.`teachsweep.role` = 'trial'")
            pid = int(run.data.tags["teachsweep.pid"].rsplit(":", 1)[1])
            return len(client.get_metric_history(run.info.run_id, "teacher/val_acc")), pid
        except Exception:  # noqa: BLE001 - the store, the run or its tag does not exist yet
            return 0, None

    killer = threading.Thread(target=kill_the_worker_after_its_second_checkpoint, daemon=True)
    killer.start()
    outcome = run_sweep(parse_spec(text), text)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    (row,) = outcome.trials
    assert row["status"] == "OK", row["error"]
    assert row["metrics"]["steps/teacher"] == epochs * 60 and row["metrics"]["trial/resumed_from_epoch"] >= 2
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("killed-worker").experiment_id], "tags.`teachsweep.role` = 'trial'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "teacher/val_acc")}
    assert steps == set(range(1, epochs + 1))


def test_a_restarted_smat_job_continues_exactly_where_it_stopped(tmp_path, monkeypatch):
    from teachsweep.jobs import scaffold

    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path))
    job = small_scaffold_job(vit_digits_teacher("vit:1"), "smat", 3, patience=3)
    uninterrupted = scaffold.train(job)
    crashed = CrashAfter(1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        scaffold.train(job, crashed)
    assert {"student", "optimizer", "teacher_explainer", "meta_optimizer", "best_student"} <= set(crashed.saved)
    resumed = Resume(crashed.saved)
    final = scaffold.train(job, resumed)
    assert [h["epoch"] for h in resumed.history[:-1]] == [2, 3] and final["trial/resumed_from_epoch"] == 1
    for key in ("loss/train", "loss/meta", "simulability/val", "simulability/test", "best_epoch"):
        assert final[key] == pytest.approx(uninterrupted[key], rel=1e-6), key
