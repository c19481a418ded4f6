"""teachsweep: hyperparameter sweeps for teachability research (LoT, SMaT, relevance explanations).

Bad input (a spec, a file, a tracking URI) ends with one line on stderr naming the problem and exit code 2,
before anything is created.

`app` is the typer app (app.py); its commands are in running.py (run, validate, resume), reading.py (list,
status, best, report, export, ui) and bench.py (`teachsweep bench ...`); tables.py builds what they print,
terminal.py is where it goes."""

from teachsweep.cli.app import app, main

__all__ = ["app", "main"]
