"""Pipelines: sweeps run as stages of one study, a later stage taking its teachers from an earlier one.

    pipeline: lot-simulability          # names the pipeline (and, by default, the MLflow experiment)
    results_dir: ...                    # shared by every stage (so is tracking_uri)
    stages:
      - {name: lot-teachers, job: lot, ...}
      - {name: lot-students, job: scaffold, config: {teacher: "sweep:lot-teachers/each"}, ...}

Each stage is a complete sweep spec. Stages run in order; a stage starts when the ones before it have finished
(a stage whose trials failed stops the pipeline). Running the file again resumes: finished stages are skipped,
an interrupted one resumes like any sweep, so no stage repeats and no run is duplicated. In MLflow, the pipeline
is a run whose children are the stages' parent runs (tagged `teachsweep.pipeline` and `teachsweep.stage`), and
every trial is tagged with its stage and the teacher it used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from teachsweep import preflight, tracking
from teachsweep.layout import DEFAULT_RESULTS, SweepDir
from teachsweep.results import open_sweep
from teachsweep.spec import (
    NAME_RE,
    SpecError,
    SweepSpec,
    load_yaml,
    non_finite_number,
    number_problem,
    parse_spec,
)

PIPELINE_KEYS = {"pipeline", "description", "results_dir", "tracking_uri", "stages"}


@dataclass
class Stage:
    index: int
    name: str
    text: str  # the stage's own spec, as YAML (what its results directory keeps)
    raw: dict[str, Any]
    spec: SweepSpec


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]
    results_dir: str

    @property
    def layout(self) -> SweepDir:
        """The pipeline's own directory beside its stages' (it holds the pipeline's MLflow run id)."""
        return SweepDir.of(self.name, self.results_dir)


def is_pipeline(text: str) -> bool:
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return False
    return isinstance(raw, dict) and "stages" in raw


def parse_pipeline(text: str, where: str = "") -> Pipeline:
    """The pipeline's stages, each parsed and validated as a sweep spec (pure, like parse_spec: the references
    between stages are checked by check_pipeline)."""
    raw = load_yaml(text, where)
    unknown = sorted(set(raw) - PIPELINE_KEYS)
    if unknown:
        raise SpecError(f"{where}{unknown[0]}: unknown key")
    name = raw.get("pipeline")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(f"{where}pipeline: required, letters, digits, '_', '-' and '.'")
    if not isinstance(raw["stages"], list) or not raw["stages"]:
        raise SpecError(f"{where}stages: a non-empty list of sweep specs")
    shared = {k: raw[k] for k in ("results_dir", "tracking_uri") if k in raw}
    if found := non_finite_number(shared):  # the pipeline's own keys, named as the pipeline's
        raise SpecError(f"{where}{'.'.join(map(str, found[0]))}: {number_problem(found[1])}")
    stages = []
    for index, body in enumerate(raw["stages"]):
        if not isinstance(body, dict):
            raise SpecError(f"{where}stages[{index}]: a sweep spec (a mapping)")
        stage_raw = {"experiment": name} | shared | body | {"pipeline": name, "stage": index}
        stage_name = stage_raw.get("name")
        if not isinstance(stage_name, str):
            raise SpecError(f"{where}stages[{index}].name: required, a name (got {stage_name!r})")
        if stage_name == name or stage_name in {s.name for s in stages}:
            raise SpecError(
                f"{where}stages[{index}].name: '{stage_name}' is taken (stage names must be distinct "
                "and differ from the pipeline's)"
            )
        stage_text = yaml.safe_dump(stage_raw, sort_keys=False)
        spec = parse_spec(stage_text, where=f"{where}stages[{index}].")
        stages.append(Stage(index, spec.name, stage_text, stage_raw, spec))
    return Pipeline(name, stages, shared.get("results_dir", DEFAULT_RESULTS))


def check_pipeline(pipeline: Pipeline, where: str = "") -> None:
    """The preflight of every stage: references to earlier stages that have not finished yet are checked as far
    as they can be (the stage exists before and runs a job that saves teachers); the rest, completely."""
    pending: dict[str, str] = {}
    earlier: dict[str, SweepSpec] = {}
    for stage in pipeline.stages:
        preflight.check_spec(stage.spec, where=f"{where}stages[{stage.index}].", pending=pending)
        preflight.check_teacher_endpoints(stage.spec, earlier, where=f"{where}stages[{stage.index}].")
        if not stage_finished(stage.spec):
            pending[stage.spec.name] = stage.spec.job
        earlier[stage.spec.name] = stage.spec


def stage_finished(spec: SweepSpec) -> bool:
    """Whether a stage's sweep has run to the end (its parent run FINISHED), from its results directory."""
    try:
        sweep = open_sweep(spec.name, spec.results_dir)
    except SpecError:
        return False
    if sweep.parent_run_id is None:
        return False
    return tracking.RetryingClient(sweep.tracking_uri).get_run(sweep.parent_run_id).info.status == "FINISHED"


def pipeline_run(pipeline: Pipeline, spec: SweepSpec, text: str) -> str:
    """The pipeline's MLflow run (created once; its id kept in <results>/<pipeline>/mlflow_pipeline_run_id)."""
    client = tracking.client_for(preflight.tracking_uri_of(spec))
    artifacts = SweepDir.of(spec.name, spec.results_dir).artifacts.as_uri()  # beside the stage's own store
    experiment_id = tracking.ensure_experiment(client, spec.experiment or pipeline.name, artifacts)
    id_file = pipeline.layout.pipeline_run
    if id_file.exists():
        return id_file.read_text().strip()
    tags = {"teachsweep.pipeline": pipeline.name, "teachsweep.role": "pipeline"}
    run_id = tracking.retry(lambda: client.create_run(experiment_id, run_name=pipeline.name, tags=tags)).info.run_id
    tracking.retry(lambda: client.log_text(run_id, text, "pipeline.yaml"))
    pipeline.layout.path.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


def run_pipeline(pipeline: Pipeline, text: str, callbacks_for=None, on_stage=None, where: str = "") -> list:
    """Check every stage, then run (or resume) them in order; returns the outcomes of the stages run now.
    `callbacks_for(spec)` gives Tune callbacks per stage; `on_stage(stage, outcome or None)` hears each stage end
    (None: skipped); `where` prefixes refusals (the pipeline file)."""
    from teachsweep.sweep import run_sweep  # heavy (Ray, Tune): checking a pipeline does not start them

    check_pipeline(pipeline, where)
    outcomes, run_id = [], None
    for stage in pipeline.stages:
        spec = stage.spec
        if stage_finished(spec):
            if on_stage:
                on_stage(stage, None)
            continue
        run_id = run_id or pipeline_run(pipeline, spec, text)
        # checked again by run_sweep now that every earlier stage has finished: `sweep:<stage>/each` expands here
        outcome = run_sweep(
            spec,
            stage.text,
            callbacks_for(spec) if callbacks_for else None,
            pipeline_run_id=run_id,
            where=f"{where}stages[{stage.index}].",
        )
        outcomes.append(outcome)
        if on_stage:
            on_stage(stage, outcome)
        if any(row["status"] != "OK" for row in outcome.trials):
            break  # later stages would read teachers this one did not make
    else:
        if run_id is not None:
            tracking.finish_run(tracking.client_for(preflight.tracking_uri_of(pipeline.stages[-1].spec)), run_id)
    return outcomes
