"""A sweep people can trust: a driver killed with SIGKILL resumes without duplicates, failing trials are
recorded and the sweep goes on, several objectives keep a Pareto front, and the CLI reads it all back."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from teachsweep.cli import app
from teachsweep.ranking import pareto_front
from teachsweep.results import open_sweep
from teachsweep.spec import SpecError, parse_spec
from teachsweep.sweep import run_sweep

pytestmark = pytest.mark.integration
TEACHSWEEP = str(Path(sys.executable).parent / "teachsweep")

SPEC = """
name: {name}
job: lot
config: {{task: digits, teacher: "cnn:8", epochs: {epochs}, steps_per_epoch: {steps}, batch_size: 32, max_eval_examples: 64,
          optimizer: sgd, lr: 0.05}}
space:
  alpha: {{type: loguniform, low: 0.1, high: 1.0}}
  student_steps: {{type: int, low: 1, high: 2}}
num_samples: {samples}
max_concurrent_trials: 2
results_dir: {results}
"""


def trial_runs(sweep):
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.name)
    query = f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}' and tags.`teachsweep.role` = 'trial'"
    return client.search_runs([experiment.experiment_id], filter_string=query)


def kill_driver(driver: subprocess.Popen) -> None:
    driver.send_signal(signal.SIGKILL)  # the driver only: its Ray processes share its fate


def kill_then_resume(tmp_path, name: str, text: str, kill_when, interrupt=kill_driver):
    """Run the sweep in a driver process, `interrupt` it (SIGKILL by default) as soon as `kill_when(sweep, trial
    runs)` returns a value, then `teachsweep resume` it: that value and the resume."""
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed with the process
    driver = subprocess.Popen(
        [TEACHSWEEP, "run", str(spec_file)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline, killed = time.time() + 400, None
    while killed is None and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if not (results / name / "mlflow_parent_run_id").exists():
            continue  # still starting; reading a store the driver is creating would race its schema set-up
        sweep = open_sweep(name, results)
        killed = kill_when(sweep, trial_runs(sweep))
        if killed is not None:
            interrupt(driver)
    driver.wait(timeout=60)
    assert killed is not None, (
        "the sweep ended before it could be killed: " + (tmp_path / "driver.log").read_text()[-3000:]
    )
    time.sleep(3)
    resumed = subprocess.run(
        [TEACHSWEEP, "resume", name, "--results-dir", str(results)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    return killed, resumed


@pytest.mark.slow
def test_killed_driver_resumes_with_one_run_per_trial_and_no_running_optuna_trial(tmp_path):
    results = tmp_path / "results"

    def mid_trial(sweep, runs):
        running = [r for r in runs if r.info.status == "RUNNING" and r.data.metrics]
        return True if running and any(r.info.status == "FINISHED" for r in runs) else None

    text = SPEC.format(name="killed", epochs=4, steps=150, samples=4, results=results)
    kill_then_resume(tmp_path, "killed", text, mid_trial)

    sweep = open_sweep("killed", results)
    runs = trial_runs(sweep)
    trial_ids = [r.data.tags["teachsweep.trial_id"] for r in runs]
    assert len(runs) == 4 and len(set(trial_ids)) == 4  # every planned trial, each with exactly one run
    assert all(r.info.status == "FINISHED" for r in runs)
    # A trial started after Tune's last snapshot is re-run under a new id; its first run is set aside, not lost.
    client = MlflowClient(sweep.tracking_uri)
    experiment_id = client.get_experiment_by_name("killed").experiment_id
    deleted = client.search_runs([experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert all(r.info.status != "RUNNING" and "teachsweep.orphaned" in r.data.tags for r in deleted)
    for run in runs:
        steps = [
            m.step for m in MlflowClient(sweep.tracking_uri).get_metric_history(run.info.run_id, "teacher/val_acc")
        ]
        assert sorted(steps) == [1, 2, 3, 4]  # each epoch logged once, also by a re-run after the resume
    study = optuna.load_study(study_name="killed", storage=sweep.optuna_url)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    # the resumed sampler does not replay the configurations already tried, and one the dead driver was
    # training comes back (re-run by Tune, or enqueued when Tune never recorded its trial)
    complete = [t.params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({tuple(sorted(p.items())) for p in complete}) == 4, complete
    # (a trial the driver was killed inside asking holds no configuration: there is nothing to bring back)
    failed = [t.params for t in study.trials if t.state == optuna.trial.TrialState.FAIL and t.params]
    assert all(p in complete for p in failed), (failed, complete)


@pytest.mark.slow
def test_a_driver_killed_while_the_last_trial_reports_completes_the_sweep_once_on_resume(tmp_path):
    results, epochs, samples = tmp_path / "results", 4, 3

    def last_trial_reporting(sweep, runs):
        finished = [r for r in runs if r.info.status == "FINISHED"]
        last = [r for r in runs if r.info.status == "RUNNING"]
        if len(finished) != samples - 1 or len(last) != 1:
            return None
        history = MlflowClient(sweep.tracking_uri).get_metric_history(last[0].info.run_id, "teacher/val_acc")
        return len(history) if len(history) >= epochs - 1 else None  # the last trial reports its final epochs

    text = SPEC.format(
        name="last", epochs=epochs, steps=120, samples=samples, results=results
    )  # (a window the poll sees)
    killed_at, resumed = kill_then_resume(tmp_path, "last", text, last_trial_reporting)
    sweep = open_sweep("last", results)
    runs = trial_runs(sweep)
    histories = [
        sorted(m.step for m in MlflowClient(sweep.tracking_uri).get_metric_history(r.info.run_id, "teacher/val_acc"))
        for r in runs
    ]
    study = optuna.load_study(study_name="last", storage=sweep.optuna_url)
    states = [t.state.name for t in study.trials]
    parent = MlflowClient(sweep.tracking_uri).get_run(sweep.parent_run_id)
    counts = f"killed at epoch {killed_at} of the last trial; {len(runs)} runs, histories {histories}, Optuna {states}"
    assert len(runs) == samples and all(r.info.status == "FINISHED" for r in runs), counts
    assert all(h == list(range(1, epochs + 1)) for h in histories), counts  # each epoch logged exactly once
    assert states.count("COMPLETE") == samples and "RUNNING" not in states, counts  # told to Optuna once
    assert parent.info.status == "FINISHED" and resumed.stdout.count("verdict") == 1, counts


def test_a_pruned_checkpoint_is_replaced_by_the_newest_whole_later_one(tmp_path):
    """A checkpoint is whole when its state.pt is a complete archive: a copy cut short by the kill is passed over,
    whichever number it has (a resumed trial rewrites numbers in place), and so is an empty placeholder."""
    import torch

    from teachsweep.tune_state import newest_whole_after, whole_checkpoint

    for number in (2, 3, 4, 5):
        (tmp_path / f"checkpoint_{number:06d}").mkdir()
        torch.save({"epoch": number, "weights": torch.randn(2000)}, tmp_path / f"checkpoint_{number:06d}/state.pt")
    (tmp_path / "checkpoint_notanumber").mkdir()
    cut_short(tmp_path / "checkpoint_000005/state.pt")
    cut_short(tmp_path / "checkpoint_000003/state.pt")
    (tmp_path / "checkpoint_000006").mkdir()  # a placeholder for Tune to delete
    assert [whole_checkpoint(tmp_path / f"checkpoint_{n:06d}") for n in (2, 3, 4, 5, 6)] == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert newest_whole_after(tmp_path, 1).name == "checkpoint_000004"
    assert newest_whole_after(tmp_path, 3).name == "checkpoint_000004"
    assert newest_whole_after(tmp_path, 4) is None


def snapshot_naming(trials: Path, trial: str, numbers: list[int]) -> None:
    """A Tune snapshot in `trials` whose one trial has registered checkpoints `numbers` (the last is the one it
    resumes from), built with Ray's own bookkeeping classes, as Tune writes it."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    run = _TrainingRunMetadata()
    run.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    for number in numbers:
        path = trials / trial / f"checkpoint_{number:06d}"
        existed = path.exists()
        path.mkdir(parents=True, exist_ok=True)  # (Tune's pruning deletes what it no longer keeps)
        run.checkpoint_manager.register_checkpoint(_TrainingResult(Checkpoint(str(path)), {"epoch": number + 1}))
        if not existed and path.exists():
            path.rmdir()
    (trials / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [["{}", run.get_json_state()]], "runner_data": {}})
    )


def checkpoint_with(path: Path, epoch: int) -> None:
    import torch

    path.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "weights": torch.randn(2000)}, path / "state.pt")


def test_a_trial_whose_snapshot_names_pruned_checkpoints_resumes_from_the_newest_whole_later_one(tmp_path):
    """The snapshot resumes trial t from checkpoint 1 and still tracks 0; both are gone, 2 and 3 are whole and 4
    was cut short by the kill. Checkpoint 3 moves into 1's place, 2 and 4 go (Tune no longer tracks them and the
    trial writes those numbers again), 0 comes back empty for Tune to delete; a second pass changes nothing."""
    from teachsweep.layout import SweepDir
    from teachsweep.tune_state import restore_pruned_checkpoints

    paths = SweepDir.of("s", tmp_path / "results")
    trial_dir = paths.trials / "t"
    snapshot_naming(paths.trials, "t", [0, 1])
    for number in (2, 3, 4):
        checkpoint_with(trial_dir / f"checkpoint_{number:06d}", number + 1)
    cut_short(trial_dir / "checkpoint_000004/state.pt")
    said = restore_pruned_checkpoints(paths)
    assert any("checkpoint_000001" in line and "resuming from checkpoint_000003" in line for line in said), said
    assert sorted(p.name for p in trial_dir.iterdir()) == ["checkpoint_000000", "checkpoint_000001"]
    assert not any((trial_dir / "checkpoint_000000").iterdir())
    assert torch_load(trial_dir / "checkpoint_000001/state.pt")["epoch"] == 4
    assert restore_pruned_checkpoints(paths) == []


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def test_a_file_where_the_checkpoint_to_resume_from_should_be_is_set_aside(tmp_path):
    from teachsweep.layout import SweepDir
    from teachsweep.tune_state import restore_pruned_checkpoints

    paths = SweepDir.of("s", tmp_path / "results")
    trial_dir = paths.trials / "t"
    snapshot_naming(paths.trials, "t", [0, 1])
    (trial_dir / "checkpoint_000001").write_text("not a checkpoint")
    checkpoint_with(trial_dir / "checkpoint_000002", 3)
    said = restore_pruned_checkpoints(paths)
    assert said[0] == "trial t: checkpoint_000001 was not a directory; set aside as checkpoint_000001.not-a-checkpoint"
    assert torch_load(trial_dir / "checkpoint_000001/state.pt")["epoch"] == 3


def test_pruned_checkpoints_with_nothing_whole_after_them_restart_the_trial_and_odd_entries_are_said(tmp_path):
    """Nothing whole after the pruned checkpoint: an empty one stands in, which a job reads as none (the trial
    starts over in its own run). A kept checkpoint that is gone while the latest exists comes back empty. A file
    where a checkpoint should be, an unreadable snapshot: a line each, no traceback."""
    from teachsweep.layout import SweepDir
    from teachsweep.tracking import load_state
    from teachsweep.tune_state import restore_pruned_checkpoints

    paths = SweepDir.of("s", tmp_path / "results")
    trial_dir = paths.trials / "t"
    snapshot_naming(paths.trials, "t", [4, 5])
    checkpoint_with(trial_dir / "checkpoint_000006", 7)
    cut_short(trial_dir / "checkpoint_000006/state.pt")
    said = restore_pruned_checkpoints(paths)
    assert any("no later checkpoint is whole; the trial starts over" in line for line in said), said
    assert sorted(p.name for p in trial_dir.iterdir()) == ["checkpoint_000004", "checkpoint_000005"]
    assert load_state(trial_dir / "checkpoint_000005") is None

    snapshot_naming(paths.trials, "t", [7, 8])
    checkpoint_with(trial_dir / "checkpoint_000008", 9)
    said = restore_pruned_checkpoints(paths)
    assert said == ["trial t: checkpoint_000007, which Tune still tracks, was pruned; an empty one stands in for Tune"]
    assert load_state(trial_dir / "checkpoint_000008")["epoch"] == 9

    snapshot_naming(paths.trials, "t", [9, 10])
    checkpoint_with(trial_dir / "checkpoint_000010", 11)
    (trial_dir / "checkpoint_000009").write_text("not a directory")
    assert restore_pruned_checkpoints(paths) == [
        "trial t: checkpoint_000009 is not a directory; Tune will fail to delete it"
    ]
    next(paths.trials.glob("experiment_state-*.json")).write_text('{"trial_data": [["{}", "{not json')
    (line,) = restore_pruned_checkpoints(paths)
    assert line.startswith("could not read which checkpoints Tune's snapshot") and line.endswith("left as is")


@pytest.mark.slow
def test_a_snapshot_naming_a_checkpoint_tune_pruned_since_resumes_from_the_newest_whole_one(tmp_path):
    """Tune writes its snapshot every few seconds but deletes a trial's old checkpoints as soon as new ones
    register: a driver killed in between leaves a snapshot naming a checkpoint that is gone. Built as such a kill
    leaves it: a snapshot copied while it named a checkpoint is put back after the kill, once that checkpoint has
    been pruned. The trial resumes from a copy of its newest whole checkpoint, and logs each epoch once."""
    import shutil

    from teachsweep.tune_state import named_checkpoints

    results, epochs = tmp_path / "results", 10
    trials, early = results / "pruned" / "tune" / "trials", tmp_path / "early_snapshot"
    named: dict[str, str] = {}

    def once_the_named_checkpoint_is_pruned(sweep, runs):
        if not named:
            for snapshot in trials.glob("experiment_state-*.json"):
                text = snapshot.read_text()  # read once: Tune rewrites the file in place
                try:
                    checkpoints = named_checkpoints(text)
                except ValueError:
                    continue  # caught mid-write
                found = {trial: kept.latest for trial, kept in checkpoints.items() if len(kept.kept) == 2}
                if found:  # a snapshot tracking two checkpoints: both will be gone, and one comes back empty
                    early.mkdir(exist_ok=True)
                    (early / snapshot.name).write_text(text)
                    named.update(found)
            return None
        trial, checkpoint = next(iter(named.items()))
        on_disk = list((trials / trial).glob("checkpoint_*"))
        return checkpoint if on_disk and not (trials / trial / checkpoint).exists() else None

    def kill_then_put_back_the_early_snapshot(driver):
        kill_driver(driver)
        driver.wait(timeout=60)
        for copy in early.iterdir():
            shutil.copyfile(copy, trials / copy.name)

    text = SPEC.format(name="pruned", epochs=epochs, steps=100, samples=1, results=results)
    pruned, resumed = kill_then_resume(
        tmp_path, "pruned", text, once_the_named_checkpoint_is_pruned, kill_then_put_back_the_early_snapshot
    )
    assert f"{pruned}, which Tune's snapshot resumes from, was pruned" in resumed.stdout, resumed.stdout[-3000:]
    said = resumed.stdout + resumed.stderr
    assert "Error handling checkpoint" not in said and "Path not found" not in said, said[-3000:]
    assert "an empty one stands in for Tune" in said, said[-3000:]
    successor = int(re.search(r"resuming from checkpoint_(\d+), moved into its place", said).group(1))
    sweep = open_sweep("pruned", results)
    (run,) = trial_runs(sweep)
    steps = sorted(
        m.step for m in MlflowClient(sweep.tracking_uri).get_metric_history(run.info.run_id, "teacher/val_acc")
    )
    assert run.info.status == "FINISHED" and steps == list(range(1, epochs + 1)), steps
    resumed_from = MlflowClient(sweep.tracking_uri).get_metric_history(run.info.run_id, "trial/resumed_from_epoch")
    assert {m.value for m in resumed_from} == {successor + 1}  # (checkpoint k holds epoch k + 1)


def set_writable(root: Path, writable: bool) -> None:
    """Every directory under `root` writable or not: by mode bits, or for root (whom mode bits do not stop) by the
    immutable attribute (ext2/3/4, XFS, Btrfs)."""
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i" if writable else "+i", str(directory)], check=True)
        else:
            directory.chmod(0o755 if writable else 0o555)


@pytest.mark.slow
def test_a_results_directory_unwritable_mid_sweep_stops_it_in_one_line_and_it_resumes(tmp_path):
    results, epochs, samples = tmp_path / "results", 4, 3
    stopped = {}

    def two_epochs_logged(sweep, runs):
        logged = [
            len(MlflowClient(sweep.tracking_uri).get_metric_history(r.info.run_id, "teacher/val_acc")) for r in runs
        ]
        return max(logged) if logged and max(logged) >= 2 else None

    def lock_until_the_driver_stops(driver):
        set_writable(results, False)
        try:
            stopped["code"] = driver.wait(timeout=600)
        finally:
            set_writable(results, True)
        stopped["last line"] = (tmp_path / "driver.log").read_text().strip().splitlines()[-1]

    text = SPEC.format(name="unwritable", epochs=epochs, steps=40, samples=samples, results=results)
    _, resumed = kill_then_resume(tmp_path, "unwritable", text, two_epochs_logged, lock_until_the_driver_stops)
    assert stopped["code"] == 2, stopped
    assert stopped["last line"].startswith("error: results directory became unwritable during sweep 'unwritable'")
    assert "teachsweep resume unwritable" in stopped["last line"], stopped
    sweep = open_sweep("unwritable", results)
    runs = trial_runs(sweep)
    histories = [
        sorted(m.step for m in MlflowClient(sweep.tracking_uri).get_metric_history(r.info.run_id, "teacher/val_acc"))
        for r in runs
    ]
    states = [t.state.name for t in optuna.load_study(study_name="unwritable", storage=sweep.optuna_url).trials]
    counts = f"{len(runs)} runs, histories {histories}, Optuna {states}"
    assert len(runs) == samples and all(r.info.status == "FINISHED" for r in runs), counts
    assert all(h == list(range(1, epochs + 1)) for h in histories), counts
    assert states.count("COMPLETE") == samples and "RUNNING" not in states, counts


def test_failing_trials_are_recorded_and_the_sweep_goes_on(ray_session, tmp_path):
    text = SPEC.format(name="failing", epochs=1, steps=5, samples=4, results=tmp_path / "r")
    text = text.replace(
        "student_steps: {type: int, low: 1, high: 2}", "lr: {type: categorical, values: [0.05, 1.0e+30]}"
    )
    spec = parse_spec(text)
    outcome = run_sweep(spec, text)
    failed = [row for row in outcome.trials if row["status"] == "ERROR"]
    ok = [row for row in outcome.trials if row["status"] == "OK"]
    assert failed and ok and len(outcome.trials) == 4
    assert all("not finite" in row["error"] for row in failed)

    sweep = open_sweep("failing", tmp_path / "r")
    runs = {r.data.tags["teachsweep.trial_id"]: r for r in trial_runs(sweep)}
    for row in failed:
        run = runs[row["trial_id"]]
        assert run.info.status == "FAILED" and "FloatingPointError" in run.data.tags["teachsweep.error"]
    study = optuna.load_study(study_name="failing", storage=sweep.optuna_url)
    assert sorted(t.state.name for t in study.trials) == sorted(["FAIL"] * len(failed) + ["COMPLETE"] * len(ok))


def test_two_objectives_keep_a_pareto_front_and_the_cli_reads_it(ray_session, tmp_path):
    results = tmp_path / "results"
    text = SPEC.format(name="pareto", epochs=1, steps=4, samples=3, results=results)
    text += "objectives:\n  - {metric: teacher/best_val_acc, mode: max}\n  - {metric: time/teacher_step_s, mode: min}\n"
    outcome = run_sweep(parse_spec(text), text)
    assert outcome.best and all(
        set(b["values"]) == {"teacher/best_val_acc", "time/teacher_step_s"} for b in outcome.best
    )

    runner = CliRunner()
    tracking_before = os.environ.get("MLFLOW_TRACKING_URI")
    best = runner.invoke(app, ["best", "pareto", "--results-dir", str(results)])
    assert best.exit_code == 0 and "Pareto front" in best.output
    status = runner.invoke(app, ["status", "pareto", "--results-dir", str(results)])
    assert status.exit_code == 0 and "3/3 done" in status.output and "FINISHED" in status.output
    listing = runner.invoke(app, ["list", "--results-dir", str(results)])
    assert listing.exit_code == 0 and "pareto" in listing.output
    export = runner.invoke(app, ["export", "pareto", "--results-dir", str(results), "--out", str(tmp_path / "ex")])
    assert export.exit_code == 0, export.output
    exported = parse_spec((tmp_path / "ex" / "best_spec.yaml").read_text())  # a runnable, valid spec
    assert exported.variants["best"]["task"] == "digits" and exported.variants["best"]["teacher"] == "cnn:8"
    # reading a sweep back must not point the process's MLflow at its store (the next sweep would log there)
    assert os.environ.get("MLFLOW_TRACKING_URI") == tracking_before


def test_reading_the_pareto_front_where_no_study_was_kept_creates_no_file(tmp_path):
    text = SPEC.format(name="pareto-moved", epochs=1, steps=4, samples=3, results=tmp_path)
    text += "objectives:\n  - {metric: teacher/best_val_acc, mode: max}\n  - {metric: time/teacher_step_s, mode: min}\n"
    store = tmp_path / "optuna.db"
    assert pareto_front(parse_spec(text), f"sqlite:///{store}") == []
    assert not store.exists()


def test_resume_of_a_sweep_that_does_not_exist(tmp_path):
    outcome = CliRunner().invoke(app, ["resume", "ghost", "--results-dir", str(tmp_path)])
    assert outcome.exit_code == 2 and "no sweep named 'ghost'" in outcome.output
    assert list(tmp_path.iterdir()) == []


def test_spec_changed_since_the_sweep_started_is_refused_with_what_changed(ray_session, tmp_path):
    results = tmp_path / "results"
    text = SPEC.format(name="changing", epochs=1, steps=2, samples=1, results=results)
    run_sweep(parse_spec(text), text)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text.replace("high: 1.0}", "high: 2.0}"))
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert outcome.exit_code == 2 and "space.alpha.high: 1.0 -> 2.0" in outcome.output
    # a finished search asked for more samples: Tune would restore the old count and run nothing
    spec_file.write_text(text.replace("num_samples: 1", "num_samples: 3"))
    outcome = CliRunner().invoke(app, ["run", str(spec_file)])
    assert outcome.exit_code == 2 and "num_samples: 1 -> 3" in outcome.output, outcome.output


def test_a_sweep_fingerprinted_before_num_samples_was_recorded_still_resumes(tmp_path):
    from teachsweep.preflight import check_stores

    spec = parse_spec(SPEC.format(name="old", epochs=1, steps=2, samples=2, results=tmp_path / "results"))
    fingerprint = tmp_path / "spec.json"
    fingerprint.write_text(json.dumps({k: v for k, v in spec.fingerprint().items() if k != "num_samples"}))
    check_stores(spec, tmp_path / "results", fingerprint, started=True)  # no refusal


def test_concurrent_writers_on_one_sqlite_store_lose_no_metric(tmp_path):
    """Four processes log 60 epochs of 5 metrics each into one SQLite MLflow store at the same time."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("concurrent")
    run_ids = [client.create_run(experiment).info.run_id for _ in range(4)]
    script = (
        "import sys\nfrom teachsweep import tracking\nclient = tracking.client_for(sys.argv[1])\n"
        "for epoch in range(60):\n"
        "    tracking.log_metrics(client, sys.argv[2], {f'm{i}': epoch * 10 + i for i in range(5)}, step=epoch)\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, uri, run_id]) for run_id in run_ids]
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0, 0]
    for run_id in run_ids:
        for i in range(5):
            history = client.get_metric_history(run_id, f"m{i}")
            assert sorted(m.step for m in history) == list(range(60))
            assert sorted(m.value for m in history) == [epoch * 10 + i for epoch in range(60)]


def test_a_trial_tune_finished_before_its_result_reached_the_study_is_completed_on_resume(tmp_path):
    """The driver can die between Tune recording a trial as finished and telling Optuna: on resume the study
    gets that result (Tune will not run the trial again), while a trial that was still running is left to its
    re-run."""
    from types import SimpleNamespace

    from teachsweep.search import StudySearcher, complete_finished_trials, fail_interrupted_trials

    spec = parse_spec(SPEC.format(name="told", epochs=1, steps=1, samples=2, results=tmp_path / "r"))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = StudySearcher(spec, storage)
    searcher.suggest("finished_1"), searcher.suggest("running_2")
    failed = fail_interrupted_trials(spec, storage)  # what a resume does first: both were RUNNING
    results = [
        SimpleNamespace(error=None, metrics={"trial_id": "finished_1", "done": True, "teacher/best_val_acc": 0.9}),
        SimpleNamespace(error=None, metrics={"trial_id": "running_2", "done": False, "teacher/best_val_acc": 0.5}),
    ]
    assert complete_finished_trials(spec, storage, failed, results) == 1
    trials = optuna.load_study(study_name="told", storage=storage).trials
    assert [(t.state.name, t.values) for t in trials] == [("FAIL", None), ("FAIL", None), ("COMPLETE", [0.9])]
    assert trials[2].params == trials[0].params


@pytest.mark.parametrize("corrected", [False, True], ids=["same-spec", "corrected-spec"])
def test_a_driver_crash_before_the_first_trial_leaves_a_sweep_that_runs_again_cleanly(ray_session, tmp_path, corrected):
    """A driver that dies after it created the stores and the Tune experiment but before Tune recorded anything
    (here a Tune callback raising on the first step, as a crashing progress display would) must not wedge the
    sweep: a later `run` must not fail with "Can't return results as experiment has not been run", and a spec
    corrected after the crash is not refused as changed, since no trial had run."""
    from ray.tune import Callback

    class CrashOnTheFirstStep(Callback):
        def on_step_begin(self, iteration, trials, **info):
            raise RuntimeError("the driver crashed before its first trial")

    results = tmp_path / "results"
    text = SPEC.format(name="crashed", epochs=1, steps=2, samples=2, results=results)
    with pytest.raises(RuntimeError, match="before its first trial"):
        run_sweep(parse_spec(text), text, callbacks=[CrashOnTheFirstStep()])
    assert (results / "crashed" / "tune" / "trials").is_dir() and (results / "crashed" / "spec.json").is_file()
    crashed_parent = (results / "crashed" / "mlflow_parent_run_id").read_text()
    had_study = (results / "crashed" / "optuna.db").exists()

    if corrected:
        text = text.replace("high: 1.0}", "high: 2.0}")
    outcome = run_sweep(parse_spec(text), text)
    assert [row["status"] for row in outcome.trials] == ["OK", "OK"], outcome.trials
    sweep = open_sweep("crashed", results)
    runs = trial_runs(sweep)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["teachsweep.trial_id"] for r in runs} == {row["trial_id"] for row in outcome.trials}
    study = optuna.load_study(study_name="crashed", storage=sweep.optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    abandoned = list((results / "crashed").glob("optuna.*.abandoned.db"))
    if corrected:  # a new study, parent run and fingerprint; the crashed study kept beside them
        assert study.trials[0].distributions["alpha"].high == 2.0
        assert len(abandoned) == int(had_study) and sweep.parent_run_id != crashed_parent
        assert sweep.spec.space["alpha"].high == 2.0
        crashed = MlflowClient(sweep.tracking_uri).get_run(crashed_parent)
        assert crashed.info.status == "FAILED"
    else:
        assert abandoned == [] and sweep.parent_run_id == crashed_parent


def test_export_points_at_the_teacher_the_best_trial_saved(ray_session, tmp_path, monkeypatch):
    """The best LoT trial's run holds its best-validation teacher (model.pt, config.json): export names it by the
    `mlflow:` reference a scaffold or explain sweep takes, and that reference resolves to a loadable teacher."""
    import torch

    from teachsweep import references

    monkeypatch.setenv("TEACHSWEEP_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    text = SPEC.format(name="exported", epochs=1, steps=2, samples=2, results=results)
    outcome = run_sweep(parse_spec(text), text)
    (best,) = outcome.best
    export = CliRunner().invoke(
        app, ["export", "exported", "--results-dir", str(results), "--out", str(tmp_path / "ex")]
    )
    assert export.exit_code == 0, export.output
    assert "checkpoint: none" not in export.output
    reference = f"mlflow:{best['mlflow_run_id']}"
    assert f"teacher: {reference}" in export.output, export.output
    sweep = open_sweep("exported", results)
    references.check(reference, "teacher", sweep.tracking_uri, results)
    artifacts = MlflowClient(sweep.tracking_uri).get_run(best["mlflow_run_id"]).info.artifact_uri
    assert artifacts in export.output, export.output
    checkpoint = Path(references.materialize(reference, sweep.tracking_uri))
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    # the results directory moved: export still finds the teacher, where the directory is now
    results.rename(tmp_path / "moved")
    moved = CliRunner().invoke(app, ["export", "exported", "--results-dir", str(tmp_path / "moved")])
    assert moved.exit_code == 0 and f"teacher: {reference}" in moved.output, moved.output
    assert str(tmp_path / "moved" / "artifacts") in moved.output.replace("\n  ", ""), moved.output


def test_starting_afresh_keeps_the_crashed_study_beside_the_new_one(tmp_path):
    from teachsweep.layout import SweepDir
    from teachsweep.sweep import start_afresh

    paths = SweepDir(tmp_path, tmp_path / "s")
    paths.trials.mkdir(parents=True)
    paths.optuna_file.write_bytes(b"the crashed study")
    paths.parent_run.write_text("0123")
    assert not paths.started
    start_afresh(paths)
    kept = list(paths.path.glob("optuna.*.abandoned.db"))
    assert [k.read_bytes() for k in kept] == [b"the crashed study"]
    assert not paths.optuna_file.exists() and not paths.parent_run.exists() and not paths.tune.exists()


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def test_tune_snapshot_files_cut_short_are_told_from_whole_ones(tmp_path):
    """A driver killed while Tune copies its snapshot leaves a truncated JSON or pickle; a grid's empty searcher
    file is whole."""
    import pickle

    from teachsweep.layout import state_file_parses

    (json_file := tmp_path / "experiment_state-x.json").write_text('{"trial_data": [[1, 2]], "runner_data": {}}')
    (pickled := tmp_path / "searcher-state-x.pkl").write_bytes(pickle.dumps({"numbers": {"a": 1}}))
    (empty := tmp_path / "searcher-state-y.pkl").write_bytes(b"")
    assert all(state_file_parses(f) for f in (json_file, pickled, empty))
    for path in (json_file, pickled):
        cut_short(path)
        assert not state_file_parses(path), path.read_bytes()


def test_a_tune_snapshot_cut_short_resumes_from_its_last_whole_copy(ray_session, tmp_path):
    """The experiment state and the searcher's files truncated as a killed driver's copy leaves them: the next
    run restores the copy the driver kept and resumes (nothing re-trained, no run added); with no copy the
    broken snapshot is set aside and the sweep starts again, one run per trial."""
    from teachsweep.layout import SweepDir

    text = SPEC.format(name="cut", epochs=1, steps=2, samples=2, results=tmp_path / "results")
    first = run_sweep(parse_spec(text), text)
    paths = SweepDir.of("cut", tmp_path / "results")
    assert sorted(p.name for p in paths.tune_backup.iterdir()) == sorted(
        p.name for p in paths.trials.iterdir() if p.name.startswith(("experiment_state-", "search"))
    )
    for pattern in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"):
        cut_short(next(paths.trials.glob(pattern)))
    again = run_sweep(parse_spec(text), text)
    assert {t["trial_id"] for t in again.trials} == {t["trial_id"] for t in first.trials}
    assert len(trial_runs(open_sweep("cut", tmp_path / "results"))) == 2

    for backup in paths.tune_backup.iterdir():
        backup.unlink()
    cut_short(next(paths.trials.glob("experiment_state-*.json")))
    restarted = run_sweep(parse_spec(text), text)
    assert len(restarted.trials) == 2 and all(t["status"] == "OK" for t in restarted.trials)
    assert len(list(paths.trials.glob("*.broken"))) == 3
    assert len(trial_runs(open_sweep("cut", tmp_path / "results"))) == 2


def test_a_sweep_stopped_after_its_trials_started_but_before_any_reported_takes_a_corrected_spec(ray_session, tmp_path):
    """Ctrl-C after Tune saved a snapshot of started trials but before any trial logged a metric: the sweep holds
    no result, so a corrected spec starts it anew (before, it was refused as a changed spec). The stopped state is
    built as such a driver leaves it: the stores, a parent run, a trial run without metrics, Tune's snapshot."""
    from mlflow.tracking import MlflowClient

    from teachsweep import preflight, tracking
    from teachsweep.layout import SweepDir

    results = tmp_path / "results"
    text = SPEC.format(name="stopped", epochs=1, steps=2, samples=2, results=results)
    paths = SweepDir.of("stopped", results)
    (paths.trials).mkdir(parents=True)
    (paths.trials / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    paths.fingerprint.write_text(json.dumps(parse_spec(text).fingerprint()))
    paths.spec_file.write_text(text)
    uri = tracking.default_tracking_uri(results)
    client = MlflowClient(uri)
    experiment = client.create_experiment("stopped")
    parent = client.create_run(experiment, tags={"teachsweep.sweep": "stopped", "teachsweep.role": "parent"})
    tags = {"mlflow.parentRunId": parent.info.run_id, "teachsweep.role": "trial", "teachsweep.trial_id": "a"}
    client.create_run(experiment, tags=tags)  # started, nothing logged yet
    paths.tracking_uri.write_text(uri)
    paths.parent_run.write_text(parent.info.run_id)
    assert paths.started

    corrected = text.replace("high: 1.0}", "high: 2.0}")
    with pytest.raises(SpecError, match="exists with a different spec"):  # what the snapshot alone decided
        preflight.check_stores(parse_spec(corrected), paths.root, paths.fingerprint, started=True)
    outcome = run_sweep(parse_spec(corrected), corrected)
    assert [row["status"] for row in outcome.trials] == ["OK", "OK"], outcome.trials
    study = optuna.load_study(study_name="stopped", storage=paths.optuna_url)
    assert {t.distributions["alpha"].high for t in study.trials} == {2.0}


@pytest.mark.slow
def test_a_second_driver_on_a_running_sweep_is_refused_in_one_line(tmp_path):
    """While a driver runs a sweep, `run` and `resume` of it from other processes are refused (exit 2, one line
    naming the driver, before Ray starts); once the driver has ended, the same command reads it back."""
    results = tmp_path / "results"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(SPEC.format(name="locked", epochs=8, steps=150, samples=2, results=results))
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([TEACHSWEEP, "run", str(spec_file)], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (results / "locked" / "mlflow_parent_run_id").exists() and time.time() < deadline:
            time.sleep(0.5)
        commands = [["run", str(spec_file)], ["resume", "locked", "--results-dir", str(results)]]
        others = [
            subprocess.Popen([TEACHSWEEP, *c], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for c in commands
        ]
        outputs = [other.communicate(timeout=300)[0] for other in others]
        still_running = driver.poll() is None
        first_code = driver.wait(timeout=900)
    assert still_running, "the first driver ended before the others were refused: nothing was tested"
    for other, output in zip(others, outputs, strict=True):
        lines = output.strip().splitlines()
        assert other.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith("error: ") and f"pid {driver.pid} on " in lines[0], lines
        assert "sweep 'locked' is being run by another driver" in lines[0] and "host is gone" not in lines[0]
    assert first_code == 0, (tmp_path / "driver.log").read_text()[-3000:]
    again = subprocess.run([TEACHSWEEP, "run", str(spec_file)], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "verdict" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(trial_runs(open_sweep("locked", results))) == 2


def test_a_lock_held_from_another_host_says_how_to_free_it(tmp_path):
    """A lock whose holder ran on another host (a replaced head node whose NFS lock outlives it) names the file to
    remove if that host is gone; on this host it does not."""
    import fcntl

    from teachsweep.layout import SweepDir
    from teachsweep.sweep import hold_driver_lock

    paths = SweepDir.of("s", tmp_path)
    paths.path.mkdir(parents=True)
    with open(paths.driver_lock, "w") as holder:
        holder.write("pid 7 on a-head-that-was-replaced, since 2026-01-01 00:00:00")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SpecError, match=f"if that host is gone, remove {paths.driver_lock}"):
            hold_driver_lock(paths, "s")
    hold_driver_lock(paths, "s").close()  # free once its holder closed it
