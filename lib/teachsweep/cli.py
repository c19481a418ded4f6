"""teachsweep: hyperparameter sweeps for teachability research (LoT, SMaT, relevance explanations).

Bad input (a spec, a file, a tracking URI) ends with one line on stderr naming the problem and exit code 2,
before anything is created."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teachsweep.jobs import JOBS
from teachsweep.layout import DEFAULT_RESULTS
from teachsweep.metrics import PAIRED_METHOD, T_METHOD, merge_seed_trials

app = typer.Typer(
    help="Hyperparameter sweeps for teachability research on Ray Tune + Optuna + MLflow.\n\n"
    "Run a sweep:  teachsweep run sweeps/quickstart.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: measured numbers, one run each.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def terminal_width() -> int:
    """COLUMNS, else the terminal's width; 100 where the output is no terminal (a pipe, a log file)."""
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


console = Console(width=terminal_width())


@app.callback()
def fit_the_terminal() -> None:
    console.width = terminal_width()  # read when a command runs, not when the module was imported


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def fitted_table(title: str, columns: list[str], **options) -> Table:
    """A table whose headers and cells wrap instead of being cut with an ellipsis when the terminal is narrow: a
    metric's header breaks after its '/', anything else that cannot wrap at a space folds."""
    if "caption" in options:
        options["caption"] = escape(options["caption"])
    table = Table(title=escape(title), **options)
    for column in columns:
        table.add_column(escape(column).replace("/", "/\n"), overflow="fold")
    return table


def print_paths(text: str) -> None:
    """Text wrapped at spaces to the terminal, where a path or URL longer than a line stays whole on its own line
    (rich would fold it, and a folded path can neither be clicked nor copied)."""
    from teachsweep.results import wrap_lines

    console.print(
        "\n".join(wrap_lines(text.splitlines(), console.width)), soft_wrap=True, highlight=False, markup=False
    )


def keep_whole(table: Table, width: int) -> Table:
    """The last column (an MLflow run id) never folds: a broken id cannot be copied."""
    table.columns[-1].min_width, table.columns[-1].no_wrap = width, True
    return table


def fail(message: str) -> None:
    """One line, exit 2; the message is plain text (a path like `lot[v2].yaml` keeps its brackets)."""
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_outcome(outcome) -> None:
    spec = outcome.spec
    shown = list(dict.fromkeys(spec.metric_names + JOBS[spec.job].scores))
    varying = sorted(
        {k for r in outcome.trials for k in r["params"] if len({str(t["params"].get(k)) for t in outcome.trials}) > 1}
        - {"variant", "task"}
    )
    searched = list(spec.space) or varying
    reported = [m for m in shown if any(m in r["metrics"] for r in outcome.trials)]
    table = fitted_table(
        f"sweep {spec.name}: {plural(len(outcome.trials), 'trial')} in {outcome.seconds:.0f} s",
        ["trial", "arm or label", *searched, *reported],
        caption=interval_caption([r["metrics"] for r in outcome.trials], reported),
        caption_justify="left",
    )
    for row in outcome.trials:
        metrics = [with_interval(row["metrics"], m) for m in reported]
        params = [short(row["params"].get(k, "")) for k in searched]
        table.add_row(
            row["trial_id"], row["label"] if row["status"] == "OK" else f"{row['label']} FAILED", *params, *metrics
        )
    console.print(table)
    if outcome.comparisons:
        columns = [
            "variant",
            "trial",
            "budget",
            "metric",
            "LoT mean ± std",
            "teacher-only mean ± std",
            "diff",
            "95% CI",
            "p",
            "seeds",
        ]
        compare = fitted_table(f"LoT minus teacher-only ({PAIRED_METHOD})", columns)
        for c in outcome.comparisons:
            compare.add_row(
                c["variant"] or "-",
                c["trial"],
                c["budget"],
                c["metric"],
                f"{c['lot_mean']:.4g} ± {c['lot_std']:.2g}",
                f"{c['teacher_only_mean']:.4g} ± {c['teacher_only_std']:.2g}",
                f"{c['diff_mean']:+.4g}",
                f"[{c['ci_low']:+.4g}, {c['ci_high']:+.4g}]",
                f"{c['p_value']:.3g}",
                str(c["n_seeds"]),
            )
        console.print(compare)
    for sentence in JOBS[spec.job].uncompared(merge_seed_trials(outcome.trials)):
        console.print(f"not compared: {sentence}", highlight=False, markup=False)
    if outcome.seed_summaries:
        console.print(seed_summary_table(outcome.seed_summaries))
    rows = merge_seed_trials(outcome.trials)
    if len(spec.objectives) > 1:
        for best in outcome.best:
            shown = {k: v for k, v in best["params"].items() if k in searched or k == "arm"}
            console.print(
                f"[bold]Pareto front[/] {values_text(best['values'])}; {params_text(shown)}; MLflow run "
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


def with_interval(metrics: dict, metric: str) -> str:
    """A table cell: the value and, where the data supports one, its 95% interval (metrics.interval_of)."""
    from teachsweep.metrics import interval_of, interval_text

    own = interval_of(metrics, metric)
    return f"{own.point:.4g} {interval_text(own.low, own.high)}" if own else short(metrics.get(metric, ""))


def interval_caption(rows_metrics: list[dict], metrics: list[str]) -> str:
    """What each column's [low, high] was computed by and on, one line per metric; or that it has none."""
    from teachsweep.metrics import interval_labels

    lines = []
    for metric in metrics:
        labels = interval_labels(rows_metrics, metric)
        lines.append(f"{metric} [low, high]: {' or '.join(labels)}" if labels else f"{metric}: no interval")
    return "\n".join(lines)


def print_verdict(spec, rows: list[dict]) -> None:
    """The verdict's sentences under 'verdict ', each wrapped to the terminal (results.wrap_lines)."""
    from teachsweep.results import verdict, wrap_lines

    if len(spec.objectives) == 1:
        lines = wrap_lines(verdict(spec, rows), console.width - len("verdict "))
        console.print("[bold]verdict[/] " + escape("\n        ".join(lines)), soft_wrap=True, highlight=False)


def values_text(values: dict) -> str:
    return ", ".join(f"{k} {short(v)}" for k, v in values.items())


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={short(v)}" for k, v in params.items()) or "no parameters"


def verdict_pick(spec, rows: list[dict]):
    from teachsweep.results import verdict_pick as pick

    return pick(spec, rows)


def seed_summary_table(rows: list[dict]) -> Table:
    """Per variant over seeds: median (IQR), mean with a Student-t 95% CI, the per-seed test-point CI (bootstrap
    over test points), and the paired difference to the `none` variant when there is one (paired t, sign-flip p)."""
    table = fitted_table(
        f"over seeds: median (IQR), mean [95% CI] ({T_METHOD}); vs none: {PAIRED_METHOD}",
        ["variant", "metric", "seeds", "median (IQR)", "mean [95% CI]", "test-point CI", "vs none [95% CI]", "p"],
    )
    for r in rows:
        points = f"[{r['test_points_ci_low']:.4g}, {r['test_points_ci_high']:.4g}]" if "test_points_ci_low" in r else ""
        versus = (
            f"{r['vs_none_diff_mean']:+.4g} [{r['vs_none_ci_low']:+.4g}, {r['vs_none_ci_high']:+.4g}]"
            if "vs_none_diff_mean" in r
            else ""
        )
        p_value = f"{r['vs_none_p_value']:.3g}" if "vs_none_p_value" in r else ""
        table.add_row(
            r["label"],
            r["metric"],
            str(r["n_seeds"]),
            f"{r['median']:.4g} ({r['q25']:.4g}–{r['q75']:.4g})",
            f"{r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}]",
            points,
            versus,
            p_value,
        )
    return table


RESULTS_DIR_ENV = "TEACHSWEEP_RESULTS_DIR"  # the results directory of specs that set none (cluster/submit.sh)


def results_dir_for(own: str | None, flag: str | None) -> str | None:
    """The results directory a run uses: --results-dir, else the spec's own, else $TEACHSWEEP_RESULTS_DIR; None
    keeps the spec's default."""
    import os

    return flag or own or os.environ.get(RESULTS_DIR_ENV) or None


def with_results_dir(spec, flag: str | None):
    own = spec.results_dir if "results_dir" in spec.model_fields_set else None
    chosen = results_dir_for(own, flag)
    return spec.model_copy(update={"results_dir": chosen}) if chosen else spec


@app.command()
def run(
    spec_file: Path = typer.Argument(..., help="a sweep spec or a pipeline of them (YAML)"),
    results_dir: str | None = typer.Option(
        None, "--results-dir", help=f"replaces the spec's results_dir (default: the spec's, else ${RESULTS_DIR_ENV})"
    ),
) -> None:
    """Run (or resume) the sweep described by SPEC_FILE and print a table of its trials and the best one; a
    pipeline file (`stages:`) runs its stages in order, skipping the finished ones."""
    from teachsweep.pipeline import is_pipeline
    from teachsweep.spec import SpecError, parse_spec, read_spec_file

    try:
        text = read_spec_file(spec_file)
        if is_pipeline(text):
            run_pipeline_file(spec_file, text, results_dir)
            return
        spec = with_results_dir(parse_spec(text, where=f"{spec_file}: "), results_dir)
        from teachsweep.progress import Progress
        from teachsweep.sweep import run_sweep

        outcome = run_sweep(spec, text, callbacks=[Progress(spec)], where=f"{spec_file}: ")
    except SpecError as error:
        fail(str(error))
    print_outcome(outcome)
    if any(row["status"] != "OK" for row in outcome.trials):
        raise typer.Exit(1)


def run_pipeline_file(spec_file: Path, text: str, results_dir: str | None = None) -> None:
    from teachsweep.pipeline import parse_pipeline, run_pipeline
    from teachsweep.progress import Progress

    def on_stage(stage, outcome) -> None:
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


def pipeline_with_results_dir(pipeline, text: str, flag: str | None):
    """The pipeline with run's results directory in every stage that does not name its own (all, with a flag)."""
    import yaml

    own = yaml.safe_load(text).get("results_dir")
    pipeline.results_dir = results_dir_for(own, flag) or pipeline.results_dir
    for stage in pipeline.stages:
        chosen = results_dir_for(stage.raw.get("results_dir"), flag)
        if chosen:
            stage.raw["results_dir"] = chosen
            stage.spec = stage.spec.model_copy(update={"results_dir": chosen})
    return pipeline


def print_teacher_effect(name: str, results_dir: str) -> None:
    """A chained stage's scores by the arm of its teacher (results.teacher_effect), if it took `each` teacher."""
    from teachsweep.results import open_sweep, teacher_effect

    chained = teacher_effect(open_sweep(name, results_dir))
    if not chained:
        return
    teachers, rows = chained
    table = fitted_table(
        f"{name} by the teacher from {teachers}: mean ({T_METHOD}); vs the baseline teacher: "
        f"{PAIRED_METHOD}, paired by teacher seed",
        ["teacher", "student variant", "metric", "seeds", "mean [95% CI]", "vs baseline teacher [95% CI]", "p"],
    )
    for r in rows:
        versus = (
            f"{r['vs_reference_diff_mean']:+.4g} [{r['vs_reference_ci_low']:+.4g}, {r['vs_reference_ci_high']:+.4g}]"
            if "vs_reference_diff_mean" in r
            else ""
        )
        table.add_row(
            r["teacher"],
            r["variant"] or "(the teacher)",
            r["metric"],
            str(r["n_seeds"]),
            f"{r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}]",
            versus,
            f"{r['vs_reference_p_value']:.3g}" if "vs_reference_p_value" in r else "",
        )
    console.print(table)


@app.command()
def validate(spec_file: Path = typer.Argument(..., help="a sweep spec or pipeline (YAML)")) -> None:
    """Check a spec without running anything."""
    from teachsweep import preflight
    from teachsweep.pipeline import check_pipeline, is_pipeline, parse_pipeline
    from teachsweep.plan import fixed_trials
    from teachsweep.spec import SpecError, parse_spec, read_spec_file

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
        preflight.check_spec(spec, where)
    except SpecError as error:
        fail(str(error))
    searched = spec.num_samples if spec.space else 0
    console.print(
        f"{spec_file}: ok (job {spec.job}: {plural(len(fixed_trials(spec)), 'fixed trial')}, {searched} searched)"
    )


RESULTS_OPTION = typer.Option(
    DEFAULT_RESULTS, "--results-dir", envvar=RESULTS_DIR_ENV, help="where sweeps keep their results"
)


def open_or_fail(name: str, results_dir: str, started: bool = False):
    """The sweep, or one line and exit 2; with `started`, a sweep that never started is refused too (what it
    would show is nothing, and its store does not exist yet)."""
    from teachsweep.results import open_sweep
    from teachsweep.spec import SpecError

    try:
        sweep = open_sweep(name, results_dir)
    except SpecError as error:
        fail(str(error))
    if started and sweep.parent_run_id is None:
        fail(f"sweep '{name}' has not started: nothing to show yet (teachsweep run its spec)")
    return sweep


@app.command()
def resume(name: str, results_dir: str = RESULTS_OPTION) -> None:
    """Resume sweep NAME from its results directory (the same as running its spec again)."""
    from teachsweep.progress import Progress
    from teachsweep.spec import SpecError
    from teachsweep.sweep import run_sweep

    sweep = open_or_fail(name, results_dir)
    spec = sweep.spec.model_copy(update={"results_dir": str(Path(results_dir))})
    try:
        outcome = run_sweep(spec, sweep.spec_text, callbacks=[Progress(spec)], where=f"{sweep.layout.spec_file}: ")
    except SpecError as error:
        fail(str(error))
    print_outcome(outcome)


@app.command("list")
def list_command(results_dir: str = RESULTS_OPTION) -> None:
    """The sweeps in the results directory, with their progress."""
    from teachsweep.results import list_sweeps, open_sweep, status
    from teachsweep.spec import SpecError

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


@app.command("status")
def status_command(
    name: str,
    results_dir: str = RESULTS_OPTION,
    watch: bool = typer.Option(False, "--watch", help="refresh every few seconds until the sweep ends"),
) -> None:
    """Trials done, running and failed, the best so far, and the elapsed time of sweep NAME."""
    from rich.progress import BarColumn, Progress, TextColumn

    from teachsweep.progress import duration
    from teachsweep.results import status

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


def best_so_far(sweep) -> str:
    """The trial the verdict would name now, with its objective's interval; the front's size for several."""
    from teachsweep.results import best_trials, trial_rows, trial_runs, with_its_interval

    runs = trial_runs(sweep)
    if len(sweep.spec.objectives) > 1:
        return f"a Pareto front of {plural(len(best_trials(sweep, runs)), 'trial')} (teachsweep best {sweep.name})"
    picked = verdict_pick(sweep.spec, trial_rows(sweep, runs))
    if picked is None:
        return "none yet"
    metric = sweep.spec.metric_names[0]
    return f"trial {picked['trial_id']} [{picked['label']}] {metric} {with_its_interval(picked, metric)}"


@app.command()
def best(name: str, results_dir: str = RESULTS_OPTION) -> None:
    """The best trial of sweep NAME, or its Pareto front when the sweep has several objectives."""
    from teachsweep.results import trial_rows, trial_runs

    sweep = open_or_fail(name, results_dir)
    runs = trial_runs(sweep)
    rows = trial_rows(sweep, runs)
    table = pareto_table(sweep, runs) if len(sweep.spec.objectives) > 1 else best_table(sweep, rows)
    if table is None:
        fail(f"sweep '{name}' has no finished trial with {', '.join(sweep.spec.metric_names)}")
    console.print(table)
    print_verdict(sweep.spec, rows)


def best_table(sweep, rows: list[dict]) -> Table | None:
    """The trial the verdict names: its id, arm, objective with its interval, parameters and MLflow run."""
    from teachsweep.metrics import interval_labels
    from teachsweep.results import point_of

    picked = verdict_pick(sweep.spec, rows)
    if picked is None:
        return None
    metric, objective = sweep.spec.metric_names[0], sweep.spec.objectives[0]
    labels = interval_labels([picked["metrics"]], metric)
    table = fitted_table(
        f"{sweep.name}: best trial ({objective.metric} {objective.mode})",
        ["trial", "arm or label", metric, "params", "MLflow run"],
        caption=f"{metric} [low, high]: {labels[0]}" if labels else f"{metric}: no interval",
        caption_justify="left",
    )
    spec = sweep.spec
    shown = list(spec.space) or sorted({k for v in spec.variants.values() for k in v} | {"arm"})
    params = {k: picked["params"][k] for k in shown if k in picked["params"]}
    value = with_interval(picked["metrics"], metric) if labels else short(point_of(picked, metric))
    table.add_row(str(picked["trial_id"]), picked["label"], value, params_text(params), str(picked["mlflow_run_id"]))
    return keep_whole(table, 32)


def pareto_table(sweep, runs) -> Table | None:
    from teachsweep.results import best_trials

    front = best_trials(sweep, runs)
    if not front:
        return None
    trial_of = dict(zip(runs["run_id"], runs["tags.teachsweep.trial_id"], strict=True)) if len(runs) else {}
    objectives = ", ".join(f"{o.metric} {o.mode}" for o in sweep.spec.objectives)
    table = fitted_table(f"{sweep.name}: Pareto front ({objectives})", ["trial", "values", "params", "MLflow run"])
    for row in front:
        table.add_row(
            str(trial_of.get(row.get("mlflow_run_id"), "?")),
            values_text(row["values"]),
            params_text(row["params"]),
            str(row.get("mlflow_run_id")),
        )
    return keep_whole(table, 32)


@app.command()
def report(name: str, results_dir: str = RESULTS_OPTION) -> None:
    """Write sweep NAME's HTML report (self-contained) into its results directory and its parent MLflow run."""
    from teachsweep.report import write_report

    sweep = open_or_fail(name, results_dir, started=True)
    path, logged = write_report(sweep)
    print_paths(f"report: file://{path}")
    if not logged:
        console.print(
            "not logged to MLflow: the parent run keeps its artifacts where the results directory was before it moved",
            highlight=False,
            markup=False,
        )


@app.command()
def export(
    name: str,
    results_dir: str = RESULTS_OPTION,
    out: Path = typer.Option(None, help="directory for the exported files (default: the sweep's export/)"),
) -> None:
    """Write the best configuration of sweep NAME as a job config and as a runnable spec."""
    import yaml

    from teachsweep.results import best_trials, full_config

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


def exported_trial(sweep, run_id: str) -> str:
    """'best trial <id> [<label>]: <objective> <value> (<low>, <high>; <how>)', each objective; and its run."""
    from teachsweep.results import trial_rows, with_its_interval

    row = next((r for r in trial_rows(sweep, merge_seeds=False) if r["mlflow_run_id"] == run_id), None)
    if row is None:
        return f"best: MLflow run {run_id}"
    values = "; ".join(f"{m} {with_its_interval(row, m)}" for m in sweep.spec.metric_names if m in row["metrics"])
    return f"best trial {row['trial_id']} [{row['label']}]: {values}\nMLflow run {run_id}"


def teacher_line(sweep, run_id: str) -> str:
    """Where the best trial's saved teacher is, by the reference a scaffold or explain sweep takes."""
    from teachsweep.references import MLFLOW
    from teachsweep.results import artifact_directory, saved_teacher
    from teachsweep.tracking import RetryingClient

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


@app.command()
def ui(
    name: str,
    results_dir: str = RESULTS_OPTION,
    port: str | None = typer.Option(
        None, help="MLflow UI port (default: 5000, or the next free one); optuna-dashboard uses port + 1"
    ),
) -> None:
    """Start the MLflow UI and optuna-dashboard on this sweep's stores, on 127.0.0.1; print the pages once they
    answer. Ctrl-C, SIGTERM or SIGHUP stops both."""
    from teachsweep import ui as servers

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
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@bench_app.command("overhead")
def bench_overhead(
    trials: int = typer.Option(4, help="trials of the small sweeps (the large ones run 3x as many)"),
    steps: int = typer.Option(40, help="teacher steps per trial (sizes the job)"),
) -> None:
    """Per-trial overhead of a teachsweep sweep versus a bare Ray Tune function trainable doing the same job."""
    from teachsweep.bench import overhead

    overhead(trials, steps, console)


@bench_app.command("lot")
def bench_lot(
    steps: int = typer.Option(30, help="teacher steps per measurement"),
    repeats: int = typer.Option(3, help="interleaved repeats per arm (the median is shown)"),
    model: str = typer.Option("resnet:8", help="teacher and student architecture"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1... (auto: CUDA when visible)"),
) -> None:
    """LoT's cost per teacher step for N in {1, 2, 4} against the teacher-only step and the FLOP ideal."""
    from teachsweep.bench import lot_cost

    lot_cost(steps, repeats, model, console, device)


@bench_app.command("relevance")
def bench_relevance(
    examples: int = typer.Option(256, help="examples explained per model"),
    batch_size: int = typer.Option(32, help="batch size of the batched explainers"),
    model: list[str] = typer.Option(
        ["minilm", "vit:4"], help="models, each on its task (text: rotten_tomatoes, image: mnist_5k); repeatable"
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1... (auto: CUDA when visible)"),
) -> None:
    """Relevance explanations per second: batched generic rule (and rollout, GradCAM, LRP) vs one example at a
    time, with the matmul GFLOP/s each reaches against this machine's (or the GPU's) peak."""
    from teachsweep.bench import relevance_throughput

    relevance_throughput(examples, batch_size, model, console, device)


@bench_app.command("scaffold")
def bench_scaffold(
    steps: int = typer.Option(20, help="interleaved iterations per arm (the median is shown)"),
    model: str = typer.Option("minilm:2", help="teacher and student architecture"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1..."),
) -> None:
    """One SMaT iteration (student step + look-ahead + meta step) over one plain student step, same batch."""
    from teachsweep.bench import scaffold_cost

    scaffold_cost(steps, model, console, device)


@bench_app.command("mfu")
def bench_mfu(
    model: str = typer.Option("minilm", help="a model name or directory, or bert-base (its shapes, random weights)"),
    task: str = typer.Option("rotten_tomatoes", help="the task the teacher job trains on"),
    batch_size: int = typer.Option(32, help="global batch size"),
    max_length: int = typer.Option(128, help="text: tokens per example at most"),
    steps: int = typer.Option(20, help="training steps per epoch (two epochs; the second is timed)"),
    workers: int = typer.Option(1, help="workers of the sweep's trial (> 1: Ray Train DDP, one GPU each)"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1... (auto: CUDA when visible)"),
    sweep: bool = typer.Option(True, help="also run the job as a one-trial sweep on Ray"),
) -> None:
    """Model FLOP utilisation of the teacher job's training step, in process and as a sweep's trial on Ray."""
    from teachsweep.bench import flop_utilisation

    flop_utilisation(model, task, batch_size, max_length, steps, workers, device, sweep, console)


@bench_app.command("rl")
def bench_rl(
    rollouts: int = typer.Option(20, help="rollouts (teacher updates) per run"),
    repeats: int = typer.Option(3, help="interleaved repeats per loop (the median is shown)"),
    task: str = typer.Option("gym:CartPole-v1", help="an RL task (gym:, minatar:, ale:)"),
    device: str = typer.Option("cpu", help="cpu, cuda, auto... (small policies run best on the CPU)"),
) -> None:
    """Teacher-only PPO's env steps per second against a minimal PPO loop, and LoT's time per teacher update
    against teacher-only beside the FLOP ideal."""
    from teachsweep.bench import rl_cost

    rl_cost(rollouts, repeats, task, console, device)


@bench_app.command("distributed")
def bench_distributed(
    steps: int = typer.Option(60, help="teacher steps per run"),
    repeats: int = typer.Option(2, help="interleaved repeats per arm (the fastest is shown)"),
) -> None:
    """The same job in-process, under a 1-worker TorchTrainer and a 2-worker gloo TorchTrainer: time per step
    and fixed start-up cost."""
    from teachsweep.bench import distributed_cost

    distributed_cost(steps, repeats, console)


def one_line_summaries(group: typer.Typer) -> None:
    """The command list shows each command's first paragraph; typer's rich help keeps its single line breaks there,
    which cut a docstring's sentence where the source line ended. Give it the paragraph as one line instead."""
    import inspect

    for command in group.registered_commands:
        text = inspect.cleandoc(command.help or (command.callback.__doc__ if command.callback else "") or "")
        command.short_help = command.short_help or " ".join(text.split("\n\n")[0].split())


one_line_summaries(app)
one_line_summaries(bench_app)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover - python -m teachsweep.cli
    main()
