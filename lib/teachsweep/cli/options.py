"""What the commands share: where sweeps keep their results (--results-dir, the spec's own,
$TEACHSWEEP_RESULTS_DIR) and the sweep a NAME names."""

from __future__ import annotations

import os

import typer
import yaml

from teachsweep.cli.terminal import fail
from teachsweep.layout import DEFAULT_RESULTS
from teachsweep.pipeline import Pipeline
from teachsweep.results import Sweep, open_sweep
from teachsweep.spec import SpecError, SweepSpec

RESULTS_DIR_ENV = "TEACHSWEEP_RESULTS_DIR"  # the results directory of specs that set none (cluster/submit.sh)

RESULTS_OPTION = typer.Option(
    DEFAULT_RESULTS, "--results-dir", envvar=RESULTS_DIR_ENV, help="where sweeps keep their results"
)


def results_dir_for(own: str | None, flag: str | None) -> str | None:
    """The results directory a run uses: --results-dir, else the spec's own, else $TEACHSWEEP_RESULTS_DIR; None
    keeps the spec's default."""
    return flag or own or os.environ.get(RESULTS_DIR_ENV) or None


def with_results_dir(spec: SweepSpec, flag: str | None) -> SweepSpec:
    own = spec.results_dir if "results_dir" in spec.model_fields_set else None
    chosen = results_dir_for(own, flag)
    return spec.model_copy(update={"results_dir": chosen}) if chosen else spec


def pipeline_with_results_dir(pipeline: Pipeline, text: str, flag: str | None) -> Pipeline:
    """The pipeline with run's results directory in every stage that does not name its own (all, with a flag)."""
    own = yaml.safe_load(text).get("results_dir")
    pipeline.results_dir = results_dir_for(own, flag) or pipeline.results_dir
    for stage in pipeline.stages:
        chosen = results_dir_for(stage.raw.get("results_dir"), flag)
        if chosen:
            stage.raw["results_dir"] = chosen
            stage.spec = stage.spec.model_copy(update={"results_dir": chosen})
    return pipeline


def open_or_fail(name: str, results_dir: str, started: bool = False) -> Sweep:
    """The sweep, or one line and exit 2; with `started`, a sweep that never started is refused too (what it
    would show is nothing, and its store does not exist yet)."""
    try:
        sweep = open_sweep(name, results_dir)
    except SpecError as error:
        fail(str(error))
    if started and sweep.parent_run_id is None:
        fail(f"sweep '{name}' has not started: nothing to show yet (teachsweep run its spec)")
    return sweep
