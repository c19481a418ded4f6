"""Planning: a validated spec becomes the list of trials to run. The fixed trials are each variant with the
job's own fixed arms (LoT's teacher-only arms at the spec's baseline budgets), one trial per seed for a grid;
the searched trials come from the Optuna study (search.py)."""

from __future__ import annotations

from typing import Any

from teachsweep import references
from teachsweep.jobs import JOBS, ArmPlan
from teachsweep.spec import SweepSpec


def fixed_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Trials that are not searched: each variant (with its fixed arms) and the search's fixed arms.
    A grid (no search space) runs each seed as its own trial, so seeds spread over the cluster."""
    trials = unseeded_fixed_trials(spec)
    if spec.space or len(spec.seeds) == 1:
        return trials
    return [{**trial, "seed": seed} for seed in spec.seeds for trial in trials]  # seed-major: mixes costs


def arm_plan(spec: SweepSpec) -> ArmPlan:
    choices = {}
    for key, param in spec.space.items():
        if param.type == "categorical":
            choices[key] = list(param.values)
        elif param.type == "int":
            choices[key] = list(range(int(param.low), int(param.high) + 1))
    return ArmPlan(spec.baseline.budgets if spec.baseline else [], choices)


def teacher_choices(
    spec: SweepSpec, name: str, overlay: dict[str, Any], pending: set[str] = frozenset()
) -> list[tuple[str, dict[str, Any]]]:
    """(label suffix, overlay) per teacher a variant runs with: a `sweep:<name>/each` reference fans the variant
    out over the earlier sweep's teachers (`sweep:...` becomes the `mlflow:<run>` of each, and `teacher_source`
    records which for MLflow); any other reference stays as it is."""
    choices = [("", {})]
    for field in JOBS[spec.job].teacher_fields:
        value = overlay.get(field, spec.config.get(field))
        where = f"variants.{name}.{field}" if field in overlay else f"config.{field}"
        expanded = references.expand(value, where, spec.results_dir, pending)
        if expanded[0][0] is None:
            continue
        choices = [
            (f"{suffix}-teacher{trial}" if len(expanded) > 1 else suffix,
             chosen | {field: reference, "teacher_source": f"{value.split('/')[0]}/{trial}"})
            for suffix, chosen in choices for trial, reference in expanded
        ]  # fmt: skip
    return choices


def unseeded_fixed_trials(spec: SweepSpec, pending: set[str] = frozenset()) -> list[dict[str, Any]]:
    job = JOBS[spec.job]
    overlays = spec.variants.items() if spec.variants else [("", {})]
    trials = []
    for name, overlay in overlays:
        tag = {"variant": name} if name else {}
        for suffix, teacher in teacher_choices(spec, name, overlay, pending) if spec.variants else [("", {})]:
            config = {**spec.config, **overlay, **teacher}
            if spec.variants:
                arm = config.get("arm", job.default_arm) if job.default_arm else None
                trials.append({"label": (f"{name}-{arm}" if arm else name) + suffix, **tag, **overlay, **teacher})
            if spec.baseline is not None:
                for arm in job.fixed_arms(config, arm_plan(spec)):
                    label = (f"{name}-{arm.pop('label')}" if name else arm.pop("label")) + suffix
                    trials.append({"label": label, **tag, **overlay, **teacher, **arm})
    return trials


def planned_configs(spec: SweepSpec, pending: set[str] = frozenset()) -> list[tuple[str, dict[str, Any], set[str]]]:
    """(where, job config, the keys set there rather than in `config`) of every kind of trial the spec can start:
    each fixed trial, and the base config of the search (its searched values are checked at the corners of the
    space by spec validation)."""
    configs = [("config", dict(spec.config), set())] if spec.space else []
    for trial in unseeded_fixed_trials(spec, pending):
        overrides = {k: v for k, v in trial.items() if k not in ("label", "variant", "teacher_source")}
        where = f"variants.{trial['variant']}" if "variant" in trial else "baseline"
        configs.append((where, {**spec.config, **overrides}, set(overrides)))
    return configs
