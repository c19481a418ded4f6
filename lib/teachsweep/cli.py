"""teachsweep: hyperparameter sweeps for teachability research (LoT, SMaT, relevance explanations).

Bad input (a spec, a file, a tracking URI) ends with one line on stderr naming the problem and exit code 2,
before anything is created."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Hyperparameter sweeps for teachability research on Ray Tune + Optuna + MLflow.\n\n"
    "Run a sweep:  teachsweep run sweeps/quickstart.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: measured numbers, one run each.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(width=160)


def fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_outcome(outcome) -> None:
    spec = outcome.spec
    shown = list(dict.fromkeys(spec.metric_names + ["teacher/test_acc", "student/test_acc", "teacher/test_ppl"]))
    varying = sorted({k for r in outcome.trials for k in r["params"]
                      if len({str(t["params"].get(k)) for t in outcome.trials}) > 1} - {"variant", "task"})  # fmt: skip
    searched = list(spec.space) or varying
    table = Table(title=f"sweep {spec.name}: {len(outcome.trials)} trials in {outcome.seconds:.0f} s")
    for column in [
        "trial",
        "arm/label",
        *searched,
        *[m for m in shown if any(m in r["metrics"] for r in outcome.trials)],
    ]:
        table.add_column(column)
    for row in outcome.trials:
        metrics = [short(row["metrics"].get(m, "")) for m in shown if any(m in r["metrics"] for r in outcome.trials)]
        params = [short(row["params"].get(k, "")) for k in searched]
        table.add_row(
            row["trial_id"], row["label"] if row["status"] == "OK" else f"{row['label']} FAILED", *params, *metrics
        )
    console.print(table)
    if outcome.comparisons:
        compare = Table(title="LoT minus teacher-only (paired by seed, 95% bootstrap CI)")
        for column in (
            "variant",
            "trial",
            "metric",
            "LoT mean ± std",
            "teacher-only mean ± std",
            "diff",
            "95% CI",
            "seeds",
        ):
            compare.add_column(column)
        for c in outcome.comparisons:
            compare.add_row(
                c["variant"] or "-", c["trial"], c["metric"], f"{c['lot_mean']:.4g} ± {c['lot_std']:.2g}",
                f"{c['teacher_only_mean']:.4g} ± {c['teacher_only_std']:.2g}", f"{c['diff_mean']:+.4g}",
                f"[{c['ci_low']:+.4g}, {c['ci_high']:+.4g}]", str(c["n_seeds"]),
            )  # fmt: skip
        console.print(compare)
    for best in outcome.best:
        console.print(f"[bold]best[/] {best['values']}  params {best['params']}")
    for row in outcome.trials:
        if row["error"]:
            console.print(f"[red]trial {row['trial_id']} failed:[/] {row['error']}")
    uri = outcome.tracking_uri
    console.print(f"\nOpen the runs:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000", soft_wrap=True)


@app.command()
def run(spec_file: Path = typer.Argument(..., help="a sweep spec (YAML)")) -> None:
    """Run (or resume) the sweep described by SPEC_FILE and print a table of its trials and the best one."""
    from teachsweep.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_file)
        from teachsweep.progress import Progress
        from teachsweep.sweep import run_sweep

        outcome = run_sweep(spec, spec_file.read_text(), callbacks=[Progress(spec.metric_names)])
    except SpecError as error:
        fail(str(error))
    print_outcome(outcome)
    if any(row["status"] != "OK" for row in outcome.trials):
        raise typer.Exit(1)


@app.command()
def validate(spec_file: Path = typer.Argument(..., help="a sweep spec (YAML)")) -> None:
    """Check a spec without running anything."""
    from teachsweep.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_file)
    except SpecError as error:
        fail(str(error))
    from teachsweep.sweep import fixed_trials

    searched = spec.num_samples if spec.space else 0
    console.print(f"{spec_file}: ok (job {spec.job}: {len(fixed_trials(spec))} fixed trials, {searched} searched)")


@bench_app.command("overhead")
def bench_overhead(
    trials: int = typer.Option(4, help="trials per sweep"),
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
) -> None:
    """LoT's cost per teacher step for N in {1, 2, 4} against the teacher-only step and the FLOP ideal."""
    from teachsweep.bench import lot_cost

    lot_cost(steps, repeats, model, console)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
