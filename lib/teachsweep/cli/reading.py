"""The commands that read sweeps back: list, status, best, report, export, ui."""

from __future__ import annotations

import time
from pathlib import Path

import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn

from teachsweep import ui as servers
from teachsweep.cli.options import RESULTS_OPTION, open_or_fail
from teachsweep.cli.tables import best_table, fitted_table, pareto_table, plural, print_verdict
from teachsweep.cli.terminal import console, fail, print_paths
from teachsweep.jobs import JOBS
from teachsweep.metrics import duration
from teachsweep.ranking import verdict_pick
from teachsweep.references import MLFLOW
from teachsweep.results import (
    Sweep,
    artifact_directory,
    best_trials,
    full_config,
    list_sweeps,
    open_sweep,
    saved_teacher,
    status,
    trial_rows,
    trial_runs,
)
from teachsweep.spec import SpecError
from teachsweep.tracking import RetryingClient
from teachsweep.verdict import with_its_interval


def list_command(results_dir: str = RESULTS_OPTION) -> None:
    """The sweeps in the results directory, with their progress."""
    if Path(results_dir).exists() and not Path(results_dir).is_dir():
        fail(f"results_dir: {Path(results_dir).resolve()} is not a directory")
    if not Path(results_dir).exists():
        fail(f"results_dir: no results directory at {Path(results_dir).resolve()} (no sweep has run there)")
    table = fitted_table(
        f"sweeps in {Path(results_dir).resolve()}",
        ["name", "pipeline stage", "job", "status", "finished", "failed", "planned", "elapsed"],
    )
    unreadable = []
    for name in list_sweeps(results_dir):
        try:
            sweep = open_sweep(name, results_dir)
            st = status(sweep)
        except SpecError as error:  # one unreadable sweep does not hide the others
            unreadable.append(str(error))
            continue
        except Exception as error:  # noqa: BLE001 - a store's own failure (a corrupt file...) is that sweep's too
            unreadable.append(f"{name}: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}")
            continue
        stage = f"{sweep.spec.pipeline} #{sweep.spec.stage}" if sweep.spec.pipeline else ""
        table.add_row(
            name,
            stage,
            sweep.spec.job,
            st["sweep_status"],
            str(st["finished"]),
            str(st["failed"]),
            str(st["planned"] or "?"),
            f"{st['elapsed_s']:.0f} s",
        )
    console.print(table)
    for line in unreadable:
        console.print(f"unreadable: {line}", highlight=False, markup=False)


def status_command(
    name: str,
    results_dir: str = RESULTS_OPTION,
    watch: bool = typer.Option(False, "--watch", help="refresh every few seconds until the sweep ends"),
) -> None:
    """Trials done, running and failed, the best so far, and the elapsed time of sweep NAME."""

    sweep = open_or_fail(name, results_dir)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[line]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(name, total=sweep.planned_trials, line="")
        while True:
            st = status(sweep)
            line = (
                f"{st['finished']}/{st['planned'] or '?'} done, {st['running']} running, {st['failed']} failed, "
                + (f"{st['interrupted']} interrupted (resume re-runs them), " if st["interrupted"] else "")
                + f"{duration(st['elapsed_s'])}"
            )
            bar.update(task, completed=st["finished"] + st["failed"], line=line)
            if not watch or st["sweep_status"] != "RUNNING":
                break
            time.sleep(5)
    stage = f"stage {sweep.spec.stage} of pipeline {sweep.spec.pipeline}, " if sweep.spec.pipeline else ""
    console.print(f"{stage}{st['sweep_status']}; best so far: {best_so_far(sweep)}", highlight=False, markup=False)


def best_so_far(sweep: Sweep) -> str:
    """The trial the verdict would name now, with its objective's interval; the front's size for several."""
    runs = trial_runs(sweep)
    if len(sweep.spec.objectives) > 1:
        return f"a Pareto front of {plural(len(best_trials(sweep, runs)), 'trial')} (teachsweep best {sweep.name})"
    picked = verdict_pick(sweep.spec, trial_rows(sweep, runs))
    if picked is None:
        return "none yet"
    metric = sweep.spec.metric_names[0]
    return f"trial {picked['trial_id']} [{picked['label']}] {metric} {with_its_interval(picked, metric)}"


def best(name: str, results_dir: str = RESULTS_OPTION) -> None:
    """The best trial of sweep NAME, or its Pareto front when the sweep has several objectives."""
    sweep = open_or_fail(name, results_dir)
    runs = trial_runs(sweep)
    rows = trial_rows(sweep, runs)
    table = pareto_table(sweep, runs) if len(sweep.spec.objectives) > 1 else best_table(sweep, rows)
    if table is None:
        fail(f"sweep '{name}' has no finished trial with {', '.join(sweep.spec.metric_names)}")
    console.print(table)
    print_verdict(sweep.spec, rows)


def report(name: str, results_dir: str = RESULTS_OPTION) -> None:
    """Write sweep NAME's HTML report (self-contained) into its results directory and its parent MLflow run."""
    from teachsweep.report import write_report  # heavy: matplotlib

    sweep = open_or_fail(name, results_dir, started=True)
    path, logged = write_report(sweep)
    print_paths(f"report: file://{path}")
    if not logged:
        console.print(
            "not logged to MLflow: the parent run keeps its artifacts where the results directory was before it moved",
            highlight=False,
            markup=False,
        )


def export(
    name: str,
    results_dir: str = RESULTS_OPTION,
    out: Path = typer.Option(None, help="directory for the exported files (default: the sweep's export/)"),
) -> None:
    """Write the best configuration of sweep NAME as a job config and as a runnable spec."""
    sweep = open_or_fail(name, results_dir)
    front = best_trials(sweep)
    if not front or not front[0]["mlflow_run_id"]:
        fail(f"sweep '{name}' has no finished trial to export")
    run_id = front[0]["mlflow_run_id"]
    config = full_config(sweep, run_id)
    seed = config.pop("seed", None)  # a spec sets seeds at the top level
    out = out or sweep.layout.export
    out.mkdir(parents=True, exist_ok=True)
    job_config = config if seed is None else config | {"seed": seed}  # runnable as job.train(config)
    (out / "best_config.yaml").write_text(yaml.safe_dump(job_config, sort_keys=False))
    spec = {
        "name": f"{name}-best",
        "job": sweep.spec.job,
        "description": f"best trial of {name} (run {run_id})",
        "config": {},
        "variants": {"best": config},
        "seeds": sweep.spec.seeds if seed is None else [seed],
        "objectives": [o.model_dump() for o in sweep.spec.objectives],
    }
    (out / "best_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    console.print(exported_trial(sweep, run_id), highlight=False, markup=False)
    print_paths(teacher_line(sweep, run_id))
    files = f"job config: {out / 'best_config.yaml'}\nspec:       {out / 'best_spec.yaml'}"
    print_paths(f"{files}\nrun it:     teachsweep run {out / 'best_spec.yaml'}")


def exported_trial(sweep: Sweep, run_id: str) -> str:
    """'best trial <id> [<label>]: <objective> <value> (<low>, <high>; <how>)', each objective; and its run."""
    row = next((r for r in trial_rows(sweep, merge_seeds=False) if r["mlflow_run_id"] == run_id), None)
    if row is None:
        return f"best: MLflow run {run_id}"
    values = "; ".join(f"{m} {with_its_interval(row, m)}" for m in sweep.spec.metric_names if m in row["metrics"])
    return f"best trial {row['trial_id']} [{row['label']}]: {values}\nMLflow run {run_id}"


def teacher_line(sweep: Sweep, run_id: str) -> str:
    """Where the best trial's saved teacher is, by the reference a scaffold or explain sweep takes."""
    if not JOBS[sweep.spec.job].saves_teacher:
        return f"checkpoint: none (job '{sweep.spec.job}' saves no teacher)"
    teacher = saved_teacher(sweep, run_id)
    if teacher is None:
        return f"checkpoint: none (the best trial's run {run_id} holds no model.pt and config.json)"
    artifacts = RetryingClient(sweep.tracking_uri).get_run(teacher).info.artifact_uri
    if sweep.moved_from is not None:  # the recorded location is where the results directory was
        artifacts = artifact_directory(sweep, teacher) or artifacts
    return (
        f"teacher: {MLFLOW}{teacher}\n  model.pt and config.json in {artifacts}\n  give `teacher: "
        f'"{MLFLOW}{teacher}"` to a scaffold or explain sweep on the tracking store {sweep.tracking_uri}'
    )


def ui(
    name: str,
    results_dir: str = RESULTS_OPTION,
    port: str | None = typer.Option(
        None, help="MLflow UI port (default: 5000, or the next free one); optuna-dashboard uses port + 1"
    ),
) -> None:
    """Start the MLflow UI and optuna-dashboard on this sweep's stores, on 127.0.0.1; print the pages once they
    answer. Ctrl-C, SIGTERM or SIGHUP stops both."""
    if port is not None and not port.isdigit():
        fail(f"--port: a port number, 1-65535 (got {port!r})")
    sweep = open_or_fail(name, results_dir, started=True)
    try:
        servers.serve(
            sweep,
            None if port is None else int(port),
            lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False),
        )
    except servers.PortInUse as error:
        fail(str(error))
    except servers.ServerFailed as error:
        fail(str(error), exit_code=1)
