"""The typer app: its commands, in the order `teachsweep --help` lists them, and the console entry point."""

from __future__ import annotations

import inspect
import sys

import typer

from teachsweep.cli import bench, reading, running
from teachsweep.cli.terminal import console, terminal_width

app = typer.Typer(
    help="Hyperparameter sweeps for teachability research on Ray Tune + Optuna + MLflow.\n\n"
    "Run a sweep:  teachsweep run sweeps/quickstart.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: measured numbers, one run each.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@app.callback()
def fit_the_terminal() -> None:
    console.width = terminal_width()  # read when a command runs, not when the module was imported


app.command()(running.run)
app.command()(running.validate)
app.command()(running.resume)
app.command("list")(reading.list_command)
app.command("status")(reading.status_command)
app.command()(reading.best)
app.command()(reading.report)
app.command()(reading.export)
app.command()(reading.ui)

bench_app.command("overhead")(bench.bench_overhead)
bench_app.command("lot")(bench.bench_lot)
bench_app.command("relevance")(bench.bench_relevance)
bench_app.command("scaffold")(bench.bench_scaffold)
bench_app.command("mfu")(bench.bench_mfu)
bench_app.command("rl")(bench.bench_rl)
bench_app.command("distributed")(bench.bench_distributed)
bench_app.command("pack")(bench.bench_pack)


def one_line_summaries(group: typer.Typer) -> None:
    """The command list shows each command's first paragraph; typer's rich help keeps its single line breaks there,
    which cut a docstring's sentence where the source line ended. Give it the paragraph as one line instead."""
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
