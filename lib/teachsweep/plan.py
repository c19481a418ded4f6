"""Planning: a validated spec becomes the list of trials to run. The fixed trials are each variant with the
job's own fixed arms (LoT's teacher-only arms at the spec's baseline budgets), one trial per seed for a grid;
the searched trials come from the Optuna study (search.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from teachsweep import references
from teachsweep.jobs import JOBS, ArmPlan
from teachsweep.spec import SweepSpec

PACK = "pack"  # a packed Tune trial's config: {"pack": [each member's params]}
OPTUNA_TRIAL = "optuna_trial"  # a searched member's Optuna trial number, among its params


def member_id(pack_id: str, index: int) -> str:
    """A pack member's trial id: its pack's Tune trial id and its place in the pack."""
    return f"{pack_id}.{index}"


def member_states(result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A pack's result as {member id: its status and metrics}, whether Tune hands it over nested (`pack` ->
    member -> metric) or flattened (`pack/<member>/<metric>`, what searchers get)."""
    result = result or {}
    if isinstance(result.get(PACK), dict):
        return result[PACK]
    states: dict[str, dict[str, Any]] = {}
    for key, value in result.items():
        if key.startswith(f"{PACK}/"):
            member, _, metric = key.removeprefix(f"{PACK}/").partition("/")
            states.setdefault(member, {})[metric] = value
    return states


def fixed_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Trials that are not searched: each variant (with its fixed arms) and the search's fixed arms.
    A grid (no search space) runs each seed as its own trial, so seeds spread over the cluster."""
    return with_seeds(spec, unseeded_fixed_trials(spec))


def with_seeds(spec: SweepSpec, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A grid's trials once per seed (a search runs its seeds inside each trial)."""
    if spec.space or len(spec.seeds) == 1:
        return trials
    return [{**trial, "seed": seed} for seed in spec.seeds for trial in trials]  # seed-major: mixes costs


def structure_key(spec: SweepSpec, trial: dict[str, Any]) -> str:
    """What a trial's config fixes of the computation: every field its job does not let pack members vary."""
    varies = JOBS[spec.job].spec.pack_varies
    config = json.loads(config_key(spec, trial))
    return json.dumps({k: v for k, v in config.items() if k not in varies and k != "teacher_source"}, sort_keys=True)


def packs_of(spec: SweepSpec, trials: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Trials grouped into packs of at most `resources.pack` members sharing their structure (model, N, K,
    batch size, steps), in the order the trials were planned."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for trial in trials:
        groups.setdefault(structure_key(spec, trial), []).append(trial)
    size = spec.resources.pack
    return [members[i : i + size] for members in groups.values() for i in range(0, len(members), size)]


def structural_params(spec: SweepSpec) -> list[str]:
    """The searched parameters that pack members must share: the first member's values are asked of the rest."""
    return [key for key in spec.space if key not in JOBS[spec.job].spec.pack_varies]


def searched_packs(spec: SweepSpec) -> list[int]:
    """The sizes of the packs of searched trials: `num_samples` in packs of `resources.pack`."""
    size = spec.resources.pack
    return [min(size, spec.num_samples - start) for start in range(0, spec.num_samples, size)] if spec.space else []


@dataclass(frozen=True)
class Plan:
    """A sweep's trials, expanded once per run (expanding `each` teachers reads the earlier sweep's store): the
    fixed trials before and after their seeds, and how many trials it runs in all."""

    unseeded: list[dict[str, Any]]
    fixed: list[dict[str, Any]]
    count: int


def plan_of(spec: SweepSpec, pending: set[str] = frozenset()) -> Plan:
    """The plan; references to `pending` pipeline stages (not run yet) stay unexpanded."""
    unseeded = unseeded_fixed_trials(spec, pending)
    fixed = with_seeds(spec, unseeded)
    return Plan(unseeded, fixed, len(fixed) + (spec.num_samples if spec.space else 0))


def planned_count(spec: SweepSpec) -> int:
    """How many trials the sweep runs: its fixed trials and, for a search, its Optuna samples."""
    return plan_of(spec).count


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
            (
                f"{suffix}-teacher{trial}" if len(expanded) > 1 else suffix,
                chosen | {field: reference, "teacher_source": f"{value.split('/')[0]}/{trial}"},
            )
            for suffix, chosen in choices
            for trial, reference in expanded
        ]
    return choices


def unseeded_fixed_trials(spec: SweepSpec, pending: set[str] = frozenset()) -> list[dict[str, Any]]:
    """Each variant's trial and the job's fixed arms beside it; fixed arms whose configs are equal (LoT's
    teacher-only arms of variants that differ only in LoT's own fields) are one trial, for every variant."""
    job = JOBS[spec.job]
    overlays = spec.variants.items() if spec.variants else [("", {})]
    planned: list[dict[str, Any] | str] = []  # trials, and in their place the key of each distinct fixed arm
    arms: dict[str, tuple[dict[str, Any], list[str]]] = {}  # key: (the arm's trial, the variants it stands for)
    for name, overlay in overlays:
        tag = {"variant": name} if name else {}
        for suffix, teacher in teacher_choices(spec, name, overlay, pending) if spec.variants else [("", {})]:
            config = {**spec.config, **overlay, **teacher}
            if spec.variants:
                arm = config.get("arm", job.default_arm) if job.default_arm else None
                planned.append({"label": (f"{name}-{arm}" if arm else name) + suffix, **tag, **overlay, **teacher})
            if spec.baseline is not None:
                for arm in job.fixed_arms(config, arm_plan(spec)):
                    trial = {"label": arm.pop("label") + suffix, **tag, **overlay, **teacher, **arm}
                    key = config_key(spec, trial)
                    if key not in arms:
                        arms[key] = (trial, [])
                        planned.append(key)
                    arms[key][1].append(name)
    return [shared_arm(*arms[p], list(spec.variants)) if isinstance(p, str) else p for p in planned]


def config_key(spec: SweepSpec, trial: dict[str, Any]) -> str:
    """The job config a fixed trial runs, as a comparable string."""
    config = {**spec.config, **{k: v for k, v in trial.items() if k not in ("label", "variant")}}
    return json.dumps(config, sort_keys=True, default=str)


def shared_arm(trial: dict[str, Any], variants: list[str], all_variants: list[str]) -> dict[str, Any]:
    """A fixed arm labelled by the variant it stands for; one that several variants share belongs to none of them
    and is labelled by them all ('a03+a10-teacher_only'), or by none when it stands for every variant."""
    if len(variants) == 1:
        return trial | {"label": f"{variants[0]}-{trial['label']}" if variants[0] else trial["label"]}
    unshared = {k: v for k, v in trial.items() if k != "variant"}
    if len(set(variants)) == len(all_variants):
        return unshared
    return unshared | {"label": f"{'+'.join(dict.fromkeys(variants))}-{trial['label']}"}


def planned_configs(
    spec: SweepSpec, pending: set[str] = frozenset(), unseeded: list[dict[str, Any]] | None = None
) -> list[tuple[str, dict[str, Any], set[str]]]:
    """(where, job config, the keys set there rather than in `config`) of every kind of trial the spec can start:
    each fixed trial (`unseeded`, the plan's, when it was made already), and the base config of the search (its
    searched values are checked at the corners of the space by spec validation)."""
    configs = [("config", dict(spec.config), set())] if spec.space else []
    for trial in unseeded_fixed_trials(spec, pending) if unseeded is None else unseeded:
        overrides = {k: v for k, v in trial.items() if k not in ("label", "variant", "teacher_source")}
        where = f"variants.{trial['variant']}" if "variant" in trial else "baseline"
        configs.append((where, {**spec.config, **overrides}, set(overrides)))
    return configs
