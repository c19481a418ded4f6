"""Preflight: everything a sweep refuses before it creates a file, run or study, each refusal one line naming the
file and field. `run`, `resume`, `validate` and pipelines call it (run_sweep and run_pipeline themselves, so no
sweep starts unchecked); reading a sweep back never does, so a finished sweep stays readable whatever happened
to the sweeps, runs and checkpoints it referenced.

    check_spec     each planned trial's own checks and teacher references; objectives no trial reports, or
                   optimised the wrong way
    check_stores   the results directory writable, the tracking store reachable, the spec unchanged since the
                   sweep started
    check_trial_fits   a trial this machine's Ray can never place; max_concurrency, the trials at a time"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from teachsweep import cluster, references, tracking
from teachsweep.jobs import JOBS
from teachsweep.layout import default_tracking_uri
from teachsweep.plan import Plan, plan_of, planned_configs, planned_count
from teachsweep.ranking import is_baseline
from teachsweep.spec import SpecError, SweepSpec, describe_changes, one_line
from teachsweep.teacher_refs import SWEEP, TeacherReferenceError, parse_sweep

ALLOW_DIRTY = "TEACHSWEEP_ALLOW_DIRTY"
RECORDED_LATER = frozenset({"num_samples"})  # fingerprint fields earlier versions did not record


def check_spec(
    spec: SweepSpec, where: str = "", pending: dict[str, str] | None = None, refuse_dirty: bool = True
) -> Plan:
    """What would otherwise fail only inside trials, refused before anything exists: each planned config's own checks
    and teacher references, and objectives that no trial reports (or optimises in the wrong direction). Returns
    the plan it checked, for the run to use (expanding it again would read earlier sweeps again).
    `pending` ({stage name: job}) are earlier stages of a pipeline that have not run yet: references to them are
    checked when their stage has finished, here only that their job saves teachers."""
    pending = pending or {}
    refuse_each_in_a_search(spec, where)
    refuse_pending_stages_without_teachers(spec, where, pending)
    try:
        plan = plan_of(spec, set(pending))
        planned = planned_configs(spec, set(pending), plan.unseeded)
    except TeacherReferenceError as error:
        raise SpecError(f"{where}{error}") from None
    reported: dict[str, str | None] = {}
    for label, config, overridden in planned:
        check_planned_config(spec, where, label, config, overridden, set(pending))
        metrics = JOBS[spec.job].metrics(config)
        reported |= metrics
        if label == "config" and spec.space:  # searched trials: Optuna needs every objective from each of them
            for objective in spec.objectives:
                if objective.metric not in metrics:
                    raise SpecError(
                        f"{where}objectives: '{objective.metric}' is never reported by job '{spec.job}' "
                        f"with this config (it reports {', '.join(sorted(metrics))})"
                    )
    check_objectives(spec, where, reported)
    check_study(spec, where, reported, refuse_dirty)
    return plan


def check_study(spec: SweepSpec, where: str, reported: dict[str, str | None], refuse_dirty: bool = True) -> None:
    """A registered study's endpoints are metrics its trials report, and its code is committed: a study's table
    names the commit it ran, so the commit must hold that code (TEACHSWEEP_ALLOW_DIRTY=1 runs it anyway, and its
    runs are tagged `teachsweep.git_dirty`, which the report shows)."""
    if spec.study is None:
        return
    endpoints = spec.study.named()
    for role, endpoint in endpoints:
        if endpoint.metric not in reported:
            raise SpecError(
                f"{where}study.{role}.metric: '{endpoint.metric}' is never reported by job '{spec.job}' "
                f"(it reports {', '.join(sorted(reported))})"
            )
    dirty = tracking.git_dirty()
    if refuse_dirty and dirty is not False and os.environ.get(ALLOW_DIRTY) != "1":
        state = "has uncommitted changes" if dirty else "is not in a git checkout (its commit is unknown)"
        raise SpecError(
            f"{where}study: the code in {tracking.CODE_DIR} {state}; commit it before running a registered study "
            f"(or set {ALLOW_DIRTY}=1: its runs are then tagged as run from a dirty tree)"
        )


def sweep_references(spec: SweepSpec) -> list[tuple[str, str]]:
    """(field, reference) of every `sweep:` teacher reference in the config and the variants."""
    fields = JOBS[spec.job].teacher_fields
    overlays = [spec.config, *spec.variants.values()]
    return [
        (field, overlay[field])
        for field in fields
        for overlay in overlays
        if isinstance(overlay.get(field), str) and overlay[field].startswith(SWEEP)
    ]


def refuse_each_in_a_search(spec: SweepSpec, where: str) -> None:
    for field in JOBS[spec.job].teacher_fields:
        value = spec.config.get(field)
        if spec.space and isinstance(value, str) and value.startswith(SWEEP) and value.endswith("/each"):
            raise SpecError(
                f"{where}config.{field}: '/each' fans out one trial per teacher: give it in a grid "
                "(variants), not to a search"
            )


def refuse_pending_stages_without_teachers(spec: SweepSpec, where: str, pending: dict[str, str]) -> None:
    for field, value in sweep_references(spec):
        name = parse_sweep(value, field)[0]
        if name in pending and not JOBS[pending[name]].saves_teacher:
            raise SpecError(f"{where}{field}: stage '{name}' runs job '{pending[name]}', which saves no teacher")


def check_planned_config(
    spec: SweepSpec, where: str, label: str, config: dict[str, Any], overridden: set[str], pending: set[str]
) -> None:
    """One planned trial's config: the job's own check, then each teacher reference it holds."""
    job = JOBS[spec.job]
    try:
        job.check(config, packed=spec.packed)
    except ValidationError as error:  # the data files it names, checked here only
        at = label if "task" in overridden else "config"
        raise SpecError(where + one_line(error, prefix=f"{at}.")) from None
    except ValueError as error:
        field = str(error).split(":")[0].split(".")[0]
        at = label if field in overridden else "config"
        raise SpecError(f"{where}{at}.{error}" if ":" in str(error) else f"{where}{label}: {error}") from None
    for field in job.teacher_fields:
        if field in config:
            try:
                references.check(config[field], field, tracking_uri_of(spec), spec.results_dir, pending)
            except TeacherReferenceError as error:
                raise SpecError(f"{where}{label if field in overridden else 'config'}.{error}") from None


def check_teacher_endpoints(spec: SweepSpec, earlier: dict[str, SweepSpec], where: str = "") -> None:
    """A study's endpoints by teacher arm against the pipeline stage whose teachers its students take: the arm is
    one that stage plans and not its baseline, the stage has a baseline, and it runs the seeds a claim needs."""
    if not spec.compares_teachers:
        return
    names = {
        parse_sweep(v, "")[0]
        for v in [spec.config.get(f) for f in JOBS[spec.job].teacher_fields]
        + [o.get(f) for o in spec.variants.values() for f in JOBS[spec.job].teacher_fields]
        if isinstance(v, str) and v.startswith(SWEEP) and v.endswith("/each")
    }
    for name in sorted(names & set(earlier)):
        teachers = earlier[name]
        job = JOBS[teachers.job]
        planned = plan_of(teachers, set(earlier)).unseeded
        labels = [t["label"] for t in planned]
        baselines = {t["label"] for t in planned if is_baseline({"params": t, "label": t["label"]}, job)}
        endpoints = spec.study.named()
        for role, endpoint in endpoints:
            if endpoint.teacher is None:
                continue
            if endpoint.teacher not in labels:
                raise SpecError(
                    f"{where}study.{role}.teacher: stage '{name}' plans no trial labelled {endpoint.teacher!r} "
                    f"(its labels: {', '.join(labels)})"
                )
            if not baselines:
                raise SpecError(f"{where}study.{role}.teacher: stage '{name}' trains no baseline teachers to pair with")
            if endpoint.teacher in baselines:
                raise SpecError(
                    f"{where}study.{role}.teacher: {endpoint.teacher!r} is the baseline it would be paired with"
                )
        if spec.study.by_teacher_seed and len(teachers.seeds) < spec.study.min_seeds:
            raise SpecError(
                f"{where}study: a study's claims need at least {spec.study.min_seeds} teacher seeds (stage '{name}' "
                f"runs {len(teachers.seeds)}); a pilot sets study.min_seeds lower"
            )


def check_objectives(spec: SweepSpec, where: str, reported: dict[str, str | None]) -> None:
    """Every objective is reported by some planned trial, and optimised in the direction the job gives it."""
    for objective in spec.objectives:
        if objective.metric not in reported:
            raise SpecError(
                f"{where}objectives: '{objective.metric}' is never reported by job '{spec.job}' "
                f"(it reports {', '.join(sorted(reported))})"
            )
        direction = reported[objective.metric]
        if direction is not None and direction != objective.mode:
            raise SpecError(
                f"{where}objectives: '{objective.metric}' is better when "
                f"{'higher' if direction == 'max' else 'lower'}; mode {objective.mode} would "
                f"optimise it the wrong way"
            )


def check_stores(spec: SweepSpec, root: Path, fingerprint: Path, started: bool = True, where: str = "") -> str:
    """The stores a sweep writes, checked before it creates any: the results directory `root` writable, the
    tracking store reachable, and the spec the same as when the sweep started (its `fingerprint` file) unless
    it never `started` a trial (then a corrected spec starts it anew). Returns the tracking URI."""
    existing = next((p for p in [root, *root.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"{where}results_dir: {root} is not writable")
    if root.exists() and not os.access(root, os.W_OK | os.X_OK):
        raise SpecError(f"{where}results_dir: {root} is not writable")
    uri = spec.tracking_uri or default_tracking_uri(root)
    try:
        tracking.check_tracking_uri(uri)
    except tracking.TrackingError as error:
        raise SpecError(f"{where}tracking_uri: {error}") from None
    if fingerprint.exists() and started:
        recorded = json.loads(fingerprint.read_text())
        # a sweep started by a version that did not record num_samples is not held to it; every other field
        # (a study's endpoints, packing) is compared, present or absent
        current = {k: v for k, v in spec.fingerprint().items() if k in recorded or k not in RECORDED_LATER}
        changes = describe_changes(recorded, current)
        if changes:
            raise SpecError(
                f"sweep '{spec.name}' exists with a different spec ({'; '.join(changes)}): use a new "
                "name, or delete its results directory"
            )
    return uri


def tracking_uri_of(spec: SweepSpec) -> str:
    """The MLflow store a sweep will log to (nothing is created here)."""
    return spec.tracking_uri or default_tracking_uri(Path(spec.results_dir).expanduser())


def check_trial_fits(spec: SweepSpec) -> None:
    """Refuse a trial that this machine's Ray can never place: Tune would wait for it forever. Only where Ray is
    this one machine and no address was given; a cluster named by RAY_ADDRESS may add nodes when trials ask for
    them, so there the request is left to its autoscaler."""
    import ray  # heavy: Ray, only when a sweep is about to run

    if os.environ.get("RAY_ADDRESS") or len(ray.nodes()) > 1:
        return
    workers, available = spec.resources.workers, ray.cluster_resources()
    driver_cpu = 0.0 if workers == 1 else 0.01  # a multi-worker trial's driver holds a token CPU (see run_sweep)
    for key, resource, per_worker, extra in (
        ("cpus", "CPU", spec.resources.cpus, driver_cpu),
        ("gpus", "GPU", spec.resources.gpus, 0.0),
    ):
        needed, there = per_worker * workers + extra, available.get(resource, 0.0)
        if needed > there + 1e-9:
            raise SpecError(
                f"resources.{key}: a trial needs {needed:g} {resource}s ({workers} worker(s) x "
                f"{per_worker:g}{' + the driver' if extra else ''}) and this machine's Ray has "
                f"{there:g}: ask for less, or run on a cluster (RAY_ADDRESS)"
            )


def max_concurrency(spec: SweepSpec) -> int:
    """Trials at a time (cluster.concurrency_for)."""
    return cluster.concurrency_for(spec, planned_count(spec)).trials
