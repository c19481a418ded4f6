"""The commands that run sweeps or check them: run (a spec or a pipeline), validate, resume; and what a finished
run prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from teachsweep import preflight
from teachsweep.cli.options import (
    RESULTS_DIR_ENV,
    RESULTS_OPTION,
    open_or_fail,
    pipeline_with_results_dir,
    with_results_dir,
)
from teachsweep.cli.tables import (
    comparisons_table,
    params_text,
    plural,
    print_verdict,
    seed_summary_table,
    teacher_effect_table,
    trials_table,
    values_text,
)
from teachsweep.cli.terminal import console, fail, print_paths
from teachsweep.endpoints import endpoint_lines, endpoint_results
from teachsweep.jobs import JOBS
from teachsweep.metrics import merge_seed_trials
from teachsweep.pipeline import check_pipeline, is_pipeline, parse_pipeline, run_pipeline
from teachsweep.ranking import verdict_pick
from teachsweep.results import open_sweep
from teachsweep.spec import SpecError, parse_spec, read_spec_file
from teachsweep.teacher_effect import teacher_effect

if TYPE_CHECKING:  # heavy: Ray
    from teachsweep.sweep import SweepOutcome


def run(
    spec_file: Path = typer.Argument(..., help="a sweep spec or a pipeline of them (YAML)"),
    results_dir: str | None = typer.Option(
        None, "--results-dir", help=f"replaces the spec's results_dir (default: the spec's, else ${RESULTS_DIR_ENV})"
    ),
) -> None:
    """Run (or resume) the sweep described by SPEC_FILE and print a table of its trials and the best one; a
    pipeline file (`stages:`) runs its stages in order, skipping the finished ones."""
    try:
        text = read_spec_file(spec_file)
        if is_pipeline(text):
            run_pipeline_file(spec_file, text, results_dir)
            return
        spec = with_results_dir(parse_spec(text, where=f"{spec_file}: "), results_dir)
        # heavy: Ray, loaded once the spec is known to be good
        from teachsweep.progress import Progress
        from teachsweep.sweep import run_sweep  # heavy: Ray and torch, only when a sweep runs

        outcome = run_sweep(spec, text, callbacks=[Progress(spec)], where=f"{spec_file}: ")
    except SpecError as error:
        stop_ray()
        fail(str(error))
    print_outcome(outcome)
    if any(row["status"] != "OK" for row in outcome.trials):
        raise typer.Exit(1)


def stop_ray() -> None:
    """Shut Ray down before the error line: at shutdown it prints the errors of the trials it still holds
    (a results directory gone unwritable fails them all), which would otherwise bury the line."""

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def run_pipeline_file(spec_file: Path, text: str, results_dir: str | None = None) -> None:
    from teachsweep.progress import Progress  # heavy: Ray

    def on_stage(stage, outcome: SweepOutcome | None) -> None:
        if outcome is None:
            console.print(f"[bold]stage {stage.index} {stage.name}[/]: finished before, skipped")
        else:
            console.print(f"[bold]stage {stage.index} {stage.name}[/]")
            print_outcome(outcome)

    pipeline = pipeline_with_results_dir(parse_pipeline(text, where=f"{spec_file}: "), text, results_dir)
    outcomes = run_pipeline(pipeline, text, lambda spec: [Progress(spec)], on_stage, f"{spec_file}: ")
    if any(row["status"] != "OK" for outcome in outcomes for row in outcome.trials):
        raise typer.Exit(1)
    for stage in pipeline.stages:
        print_teacher_effect(stage.name, stage.raw.get("results_dir", pipeline.results_dir))


def print_teacher_effect(name: str, results_dir: str) -> None:
    """A chained stage's scores by the arm of its teacher (teacher_effect.teacher_effect), if it took `each` teacher."""
    chained = teacher_effect(open_sweep(name, results_dir))
    if chained:
        console.print(teacher_effect_table(name, *chained))


def validate(spec_file: Path = typer.Argument(..., help="a sweep spec or pipeline (YAML)")) -> None:
    """Check a spec without running anything."""
    where = f"{spec_file}: "
    try:
        text = read_spec_file(spec_file)
        if is_pipeline(text):
            pipeline = parse_pipeline(text, where)
            check_pipeline(pipeline, where)
            console.print(
                f"{spec_file}: ok (pipeline {pipeline.name}: stages {', '.join(s.name for s in pipeline.stages)})"
            )
            return
        spec = parse_spec(text, where)
        plan = preflight.check_spec(spec, where, refuse_dirty=False)  # (a study is validated before it is committed)
    except SpecError as error:
        fail(str(error))
    searched = spec.num_samples if spec.space else 0
    console.print(f"{spec_file}: ok (job {spec.job}: {plural(len(plan.fixed), 'fixed trial')}, {searched} searched)")


def resume(name: str, results_dir: str = RESULTS_OPTION) -> None:
    """Resume sweep NAME from its results directory (the same as running its spec again)."""
    # heavy: Ray
    from teachsweep.progress import Progress
    from teachsweep.sweep import run_sweep  # heavy: Ray and torch, only when a sweep runs

    sweep = open_or_fail(name, results_dir)
    spec = sweep.spec.model_copy(update={"results_dir": str(Path(results_dir))})
    try:
        outcome = run_sweep(spec, sweep.spec_text, callbacks=[Progress(spec)], where=f"{sweep.layout.spec_file}: ")
    except SpecError as error:
        stop_ray()
        fail(str(error))
    print_outcome(outcome)


def print_outcome(outcome: SweepOutcome) -> None:
    """A finished run: its trials, LoT's comparisons, the summaries over seeds, the Pareto front or the verdict
    and its trial, failures, and where to look next."""
    spec = outcome.spec
    shown = list(dict.fromkeys(spec.metric_names + JOBS[spec.job].scores))
    # a grid's columns: what its variants set and its seeds (a baseline arm's own settings show in its label)
    overlaid = {k for overlay in spec.variants.values() for k in overlay} | ({"seed"} if len(spec.seeds) > 1 else set())
    varying = sorted(k for k in overlaid - {"task"} if len({str(t["params"].get(k)) for t in outcome.trials}) > 1)
    searched = list(spec.space) or varying
    reported = [m for m in shown if any(m in r["metrics"] for r in outcome.trials)]
    console.print(trials_table(outcome, searched, reported))
    reference = JOBS[spec.job].reference_arm
    chained = teacher_effect(open_sweep(spec.name, spec.results_dir)) if spec.compares_teachers else None
    by_teacher = chained[1] if chained else None
    results = endpoint_results(spec, outcome.comparisons, outcome.seed_summaries, reference, by_teacher)
    for line in endpoint_lines(spec, results):
        console.print(f"[bold]study[/] {escape(line)}", highlight=False)
    if outcome.comparisons:
        console.print(comparisons_table(outcome.comparisons))
    rows = merge_seed_trials(outcome.trials)
    for sentence in JOBS[spec.job].uncompared(rows):
        console.print(f"not compared: {sentence}", highlight=False, markup=False)
    if outcome.seed_summaries:
        console.print(seed_summary_table(outcome.seed_summaries))
    if len(spec.objectives) > 1:
        for best in outcome.best:
            params = {k: v for k, v in best["params"].items() if k in searched or k == "arm"}
            console.print(
                f"[bold]Pareto front[/] {values_text(best['values'])}; {params_text(params)}; MLflow run "
                f"{best.get('mlflow_run_id')}",
                highlight=False,
            )
    print_verdict(spec, rows)
    picked = verdict_pick(spec, rows) if len(spec.objectives) == 1 else None
    if picked is not None:
        console.print(f"best trial {picked['trial_id']}: MLflow run {picked.get('mlflow_run_id')}", highlight=False)
    for row in outcome.trials:
        if row["error"]:
            console.print(f"[red]trial {row['trial_id']} failed:[/] {row['error']}")
    if outcome.report:
        print_paths(f"\nReport: file://{outcome.report}")
    console.print(
        f"Open the runs:  teachsweep ui {spec.name}  (MLflow UI and optuna-dashboard, with the URLs of the "
        "trials, the report and the study)",
        highlight=False,
    )
