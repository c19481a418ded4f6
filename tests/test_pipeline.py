"""Chained studies: teachers saved by one stage, loaded by the next; a pipeline that resumes after kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from test_notebook import NOTEBOOK
from typer.testing import CliRunner

from teachsweep.cli import app
from teachsweep.preflight import ALLOW_DIRTY
from teachsweep.references import TeacherReferenceError, expand
from teachsweep.results import open_sweep
from teachsweep.teacher_effect import teacher_effect

pytestmark = pytest.mark.integration
TEACHSWEEP = str(Path(sys.executable).parent / "teachsweep")


def pipeline_text(results: Path, name: str = "chain", student_epochs: int = 1) -> str:
    """Stage 1: LoT teachers (a ViT, so that attention can explain them), LoT and teacher-only. Stage 2: each of
    them explained with attention to a student."""
    teachers = {
        "name": f"{name}-teachers",
        "job": "lot",
        "config": {
            "task": "digits",
            "teacher": "vit:1",
            "epochs": 2,
            "steps_per_epoch": 3,
            "batch_size": 16,
            "max_eval_examples": 64,
            "lr": 1e-3,
            "alpha": 0.5,
            "student_steps": 1,
        },
        "variants": {"lot": {}},
        "baseline": {"budget": "teacher_steps"},
        "max_concurrent_trials": 2,
    }
    students = {
        "name": f"{name}-students",
        "job": "scaffold",
        "config": {
            "teacher": f"sweep:{name}-teachers/each",
            "num_train_examples": 32,
            "batch_size": 8,
            "max_epochs": student_epochs,
            "max_eval_examples": 32,
        },
        "variants": {"attention": {"explainer": "attention"}},
        "max_concurrent_trials": 2,
    }
    return yaml.safe_dump({"pipeline": name, "results_dir": str(results), "stages": [teachers, students]})


def runs_of(results: Path, sweep_name: str, role: str = "trial"):
    sweep = open_sweep(sweep_name, results)
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.spec.experiment)
    query = f"tags.`teachsweep.sweep` = '{sweep_name}' and tags.`teachsweep.role` = '{role}'"
    return client.search_runs([experiment.experiment_id], filter_string=query)


def test_a_two_stage_pipeline_fans_out_over_each_teacher_and_resumes_without_repeating(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(pipeline_text(results))
    assert CliRunner().invoke(app, ["validate", str(spec_file)]).exit_code == 0  # stage 2 refers to a stage to come
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert outcome.exit_code == 0, outcome.output

    teachers, students = runs_of(results, "chain-teachers"), runs_of(results, "chain-students")
    assert len(teachers) == 2 and len(students) == 2, (len(teachers), len(students))  # one student per teacher
    teacher_trials = {r.data.tags["teachsweep.trial_id"] for r in teachers}
    used = {r.data.tags["teachsweep.teacher"] for r in students}
    assert used == {f"sweep:chain-teachers/{t}" for t in teacher_trials}, used
    assert all(
        r.data.tags["teachsweep.stage"] == "1" and r.data.tags["teachsweep.pipeline"] == "chain" for r in students
    )
    # Teachers round-trip: the artifact a LoT trial saved loads with weights_only into the frozen teacher
    client = MlflowClient(open_sweep("chain-teachers", results).tracking_uri)
    path = client.download_artifacts(teachers[0].info.run_id, "model.pt", str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert any(k.startswith("net.vit") for k in state)
    # the stages' parent runs hang under the pipeline's run, in one experiment
    pipeline_run = (results / "chain" / "mlflow_pipeline_run_id").read_text().strip()
    parents = runs_of(results, "chain-teachers", "parent") + runs_of(results, "chain-students", "parent")
    assert {p.data.tags["mlflow.parentRunId"] for p in parents} == {pipeline_run}

    again = CliRunner().invoke(app, ["run", str(spec_file)])  # resume: both stages finished, nothing runs
    assert again.exit_code == 0 and again.output.count("finished before, skipped") == 2, again.output
    assert len(runs_of(results, "chain-teachers")) == 2 and len(runs_of(results, "chain-students")) == 2
    listing = CliRunner().invoke(app, ["list", "--results-dir", str(results)])
    assert "chain #0" in listing.output and "chain #1" in listing.output

    # the study's answer: students' scores by the arm of their teacher, from the same MLflow runs, in the run's
    # output and the students' report
    assert "chain-students by the teacher from chain-teachers" in again.output, again.output
    name, rows = teacher_effect(open_sweep("chain-students", results))
    arm_of = {r.data.tags["teachsweep.trial_id"]: r.data.tags["teachsweep.label"] for r in teachers}
    expected = {
        (arm_of[r.data.tags["teachsweep.teacher"].rpartition("/")[2]], r.data.metrics["simulability/test"])
        for r in students
    }
    got = {(r["teacher"], r["mean"]) for r in rows if r["metric"] == "simulability/test"}
    assert name == "chain-teachers" and got == expected, (got, expected)
    baseline = {r.data.tags["teachsweep.label"] for r in teachers if r.data.tags["teachsweep.arm"] == "teacher_only"}
    compared = {(r["teacher"], r.get("reference")) for r in rows if r["metric"] == "simulability/test"}
    (reference,) = baseline  # the baseline arm, known through the job protocol, is what the LoT teacher is paired with
    assert compared == {(reference, None), (next(iter(set(arm_of.values()) - baseline)), reference)}, compared
    assert "By teacher" in (results / "chain-students" / "report.html").read_text()

    # ...and in the analysis notebook's chained-study section
    monkeypatch.setenv("TEACHSWEEP_SWEEP", "chain-students")
    monkeypatch.setenv("TEACHSWEEP_RESULTS_DIR", str(results))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "teachers from `chain-teachers`" in shown and "Each point: the mean over 1 teacher seeds" in shown, shown


def test_sweep_references_select_best_a_trial_or_each_and_refuse_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    spec_file = tmp_path / "pipeline.yaml"
    only_teachers = yaml.safe_load(pipeline_text(results, name="refs"))
    only_teachers["stages"] = only_teachers["stages"][:1]
    spec_file.write_text(yaml.safe_dump(only_teachers))
    assert CliRunner().invoke(app, ["run", str(spec_file)]).exit_code == 0
    each = expand("sweep:refs-teachers/each", "teacher", results)
    assert len(each) == 2 and all(ref.startswith("mlflow:") for _, ref in each)
    ((best_trial, best),) = expand("sweep:refs-teachers/best", "teacher", results)
    assert (best_trial, best) in each
    other_trial, other = next(pair for pair in each if pair[0] != best_trial)
    assert expand(f"sweep:refs-teachers/{other_trial}", "teacher", results) == [(other_trial, other)]
    for reference, message in (
        ("sweep:nothing/best", "no sweep named 'nothing'"),
        ("sweep:refs-teachers/abc123", "no finished trial 'abc123'"),
    ):
        with pytest.raises(TeacherReferenceError, match=message):
            expand(reference, "teacher", results)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"name: s\njob: scaffold\nconfig: {{teacher: 'sweep:nothing/each'}}\nvariants: {{a: {{}}}}\n"
        f"results_dir: {results}\n"
    )
    outcome = CliRunner().invoke(app, ["run", str(bad)])
    assert outcome.exit_code == 2 and "config.teacher: no sweep named 'nothing'" in outcome.output
    assert not (results / "s").exists()


@pytest.mark.slow
def test_a_pipeline_killed_in_its_second_stage_resumes_with_one_run_per_trial(tmp_path):
    results = tmp_path / "results"
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(pipeline_text(results, name="killed", student_epochs=20))
    env = os.environ | {"PYTHONUNBUFFERED": "1", "TEACHSWEEP_CACHE": str(tmp_path / "cache")}
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed with the process
    driver = subprocess.Popen(
        [TEACHSWEEP, "run", str(spec_file)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline, killed = time.time() + 600, False
    while time.time() < deadline and driver.poll() is None:
        time.sleep(1)
        if not (results / "killed-students" / "mlflow_parent_run_id").exists():
            continue
        # any student run still going is mid-stage 2 (waiting for its first metrics left too short a window on a
        # loaded machine: the stage could finish between two polls)
        if any(r.info.status == "RUNNING" for r in runs_of(results, "killed-students")):
            driver.send_signal(signal.SIGKILL)  # mid-stage 2; the driver's Ray processes share its fate
            killed = True
            break
    driver.wait(timeout=60)
    log.close()
    assert killed, (tmp_path / "driver.log").read_text()[-2000:]
    time.sleep(3)
    resumed = subprocess.run([TEACHSWEEP, "run", str(spec_file)], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "stage 0 killed-teachers[/]" not in resumed.stdout and "finished before, skipped" in resumed.stdout
    teachers, students = runs_of(results, "killed-teachers"), runs_of(results, "killed-students")
    trial_ids = [r.data.tags["teachsweep.trial_id"] for r in students]
    assert len(teachers) == 2, f"{len(teachers)} teacher runs"
    assert len(students) == 2 and len(set(trial_ids)) == 2, f"student runs for trials {trial_ids}"
    assert all(r.info.status == "FINISHED" for r in teachers + students)


def test_a_finished_stage_stays_readable_when_the_sweep_it_took_teachers_from_is_moved(tmp_path, monkeypatch):
    """Reading a sweep only reads: status, best, report, export and list of the students do not look for the
    teachers' sweep (its results directory moved away), only at their own directory and tracking store."""
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(pipeline_text(results, name="moved"))
    runner = CliRunner()
    assert (outcome := runner.invoke(app, ["run", str(spec_file)])).exit_code == 0, outcome.output
    by_teacher = teacher_effect(open_sweep("moved-students", results))
    (results / "moved-teachers").rename(tmp_path / "elsewhere")

    where = ["--results-dir", str(results)]
    status = runner.invoke(app, ["status", "moved-students", *where])
    assert status.exit_code == 0 and "2/2 done" in status.output and "FINISHED" in status.output, status.output
    best = runner.invoke(app, ["best", "moved-students", *where])
    assert best.exit_code == 0 and "verdict" in best.output, best.output
    (results / "moved-students" / "report.html").unlink()  # the one the run wrote
    report = runner.invoke(app, ["report", "moved-students", *where])
    assert report.exit_code == 0, report.output
    assert "By teacher" in (results / "moved-students" / "report.html").read_text()
    # the teachers' runs are still in the store (only their directory moved): the same table (repr: NaN-safe)
    assert repr(teacher_effect(open_sweep("moved-students", results))) == repr(by_teacher)
    assert by_teacher[0] == "moved-teachers" and len({r["teacher"] for r in by_teacher[1]}) == 2
    export = runner.invoke(app, ["export", "moved-students", *where])
    assert export.exit_code == 0 and "checkpoint: none (job 'scaffold' saves no teacher)" in export.output, (
        export.output
    )
    assert (results / "moved-students" / "export" / "best_spec.yaml").is_file()
    listing = runner.invoke(app, ["list", *where])
    assert listing.exit_code == 0 and "moved-students" in listing.output and "moved #1" in listing.output
    assert "moved-teachers" not in listing.output, listing.output
    # running is another matter: the students' references are checked again, and refused in one line
    again = runner.invoke(app, ["resume", "moved-students", *where])
    assert again.exit_code == 2 and "no sweep named 'moved-teachers'" in again.output, again.output
    # the teachers' sweep run again under its name: new trials, new ids; the students keep their own teachers
    rerun = tmp_path / "teachers-again.yaml"
    rerun.write_text((tmp_path / "elsewhere" / "spec.yaml").read_text())
    assert (outcome := runner.invoke(app, ["run", str(rerun)])).exit_code == 0, outcome.output
    assert repr(teacher_effect(open_sweep("moved-students", results))) == repr(by_teacher)


def test_a_registered_endpoint_pairs_the_students_by_the_seed_of_their_teacher(tmp_path, monkeypatch):
    """A students' stage registers LoT minus teacher-only (its teachers' arms) as its primary endpoint: the run
    prints it paired over the teachers' two seeds, and the report shows it first."""
    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(ALLOW_DIRTY, "1")  # a registered study from a working tree with uncommitted changes
    results = tmp_path / "results"
    stages = yaml.safe_load(pipeline_text(results, name="study"))
    teachers, students = stages["stages"]
    teachers["seeds"] = [0, 1]
    students["study"] = {
        "primary": {"metric": "simulability/test", "variant": "attention", "teacher": "lot-lot"},
        "min_seeds": 2,
    }
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(yaml.safe_dump(stages))
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert outcome.exit_code == 0, outcome.output
    said = " ".join(outcome.output.split())
    line = "primary endpoint simulability/test of attention taught by lot-lot, attention students of lot-lot − of"
    assert line in said and "(2 teacher seeds;" in said, outcome.output[-3000:]
    report = (results / "study-students" / "report.html").read_text()
    assert report.index("primary endpoint simulability/test") < report.index("Verdict")
