"""The jobs a sweep can run, and the protocol through which the sweep layer knows them.

A job is one readable module (lot, lot_rl, teacher, scaffold, explain) that ends with its declaration,
`JOB = JobSpec(...)` (the fields and their defaults below): its config model, its training loop, the metrics it
reports, and the optional hooks by which it plans fixed arms and compares them. The sweep layer reads a job only
through `JOBS[name]`, which imports the module on first use (torch and the models stay unloaded for a CLI that
only reads results).

A job's own interval of a metric it reports is `<metric>_ci_low/_ci_high`: a bootstrap over the test points of
that metric's split (SMaT's simulability); the sweep layer adds Wilson intervals of accuracies itself.

A new job plugs in by adding its module to MODULES; nothing else in the sweep layer names a job."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teachsweep.validation import CHECK_FILES

MODULES = {
    "lot": "teachsweep.jobs.lot",
    "teacher": "teachsweep.jobs.teacher",
    "scaffold": "teachsweep.jobs.scaffold",
    "explain": "teachsweep.jobs.explain",
    "lot_rl": "teachsweep.jobs.lot_rl",
}


@dataclass(frozen=True)
class ArmPlan:
    """What a job sees of the spec when it plans its fixed arms: the budgets the spec's `baseline` asks for, and
    the values each discrete searched parameter can take."""

    budgets: list[str] = field(default_factory=list)
    choices: dict[str, list[Any]] = field(default_factory=dict)


Trials = list[dict[str, Any]]  # finished trials as the runner's rows ({trial_id, label, params, status, metrics})


@dataclass(frozen=True)
class JobSpec:
    """What a job declares (`JOB = JobSpec(...)` at the end of its module)."""

    config: type  # its pydantic config model (extra="forbid")
    train: Callable[..., dict[str, float]]  # train(config, reporter): the final metrics; knows no Ray nor MLflow
    metrics: Callable[[Any], dict[str, str | None]]  # {metric: "max" | "min" | None} it reports for a config
    objective: tuple[str, str]  # (metric, mode) a sweep optimises when its spec names no objective
    scores: tuple[str, ...]  # the held-out scores of record that comparisons and tables show
    # config fields holding a teacher reference (config, checkpoint dir, mlflow:<run>), resolved and checked by
    # the sweep layer before anything starts
    teacher_fields: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None  # refuse, naming the field, what would fail inside a trial
    fixed_arms: Callable[[Any, ArmPlan], Trials] | None = None  # extra trials beside each variant (teacher-only)
    compare: Callable[[Trials, list[str]], Trials] | None = None  # its own comparisons (LoT minus teacher-only)
    # (budget, the fixed arm standing for `trial`, or None) per budget it ran
    baselines: Callable[[dict[str, Any], Trials], list[tuple[str, dict | None]]] | None = None
    uncompared: Callable[[Trials], list[str]] | None = None  # why each comparison `compare` could not make failed
    # the split a trial's objective is measured on, in words, where the metric's name does not say all of it
    selection_split: Callable[[dict[str, Any]], str] | None = None
    reference_arm: str | None = None  # the variant every other one is compared with, paired by seed (SMaT: none)
    default_arm: str | None = None  # the `arm` a config has when it names none (LoT: lot); labels fixed trials
    saves_teacher: bool = False  # it hands a teacher to `reporter.log_teacher` (a later stage can use it)
    saved_teacher_scores: tuple[str, ...] = ()  # the held-out scores of that saved teacher
    single_process: bool = False  # one process, no DDP workers: the spec refuses `workers` > 1
    # packed trials (packing.py): train_pack(configs, pack_reporter) -> {member: final metrics}; the config fields
    # members of one pack may differ in (every other field must be equal); what it refuses to pack, by field
    train_pack: Callable[..., dict[int, dict[str, float]]] | None = None
    pack_varies: frozenset[str] = frozenset()
    check_pack: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class Job:
    """A job by name, its module imported on first use."""

    name: str
    module_name: str

    @property
    def spec(self) -> JobSpec:
        declared = importlib.import_module(self.module_name).JOB
        if not isinstance(declared, JobSpec):
            raise TypeError(f"{self.module_name}.JOB is not a JobSpec")
        return declared

    @property
    def config_class(self) -> Any:
        return self.spec.config

    @property
    def train(self) -> Callable[..., dict[str, float]]:
        return self.spec.train

    @property
    def objective(self) -> tuple[str, str]:
        return self.spec.objective

    @property
    def scores(self) -> list[str]:
        return list(self.spec.scores)

    @property
    def teacher_fields(self) -> tuple[str, ...]:
        return self.spec.teacher_fields

    @property
    def default_arm(self) -> str | None:
        return self.spec.default_arm

    @property
    def saves_teacher(self) -> bool:
        return self.spec.saves_teacher

    @property
    def saved_teacher_scores(self) -> list[str]:
        return list(self.spec.saved_teacher_scores)

    @property
    def single_process(self) -> bool:
        return self.spec.single_process

    @property
    def has_fixed_arms(self) -> bool:
        return self.spec.fixed_arms is not None

    @property
    def reference_arm(self) -> str | None:
        return self.spec.reference_arm

    def metrics(self, config: dict[str, Any]) -> dict[str, str | None]:
        return self.spec.metrics(self.config_class.model_validate(config))

    def check(self, config: dict[str, Any], packed: bool = False) -> None:
        """The config validated as the preflight does (its data files must exist), then the job's own check, and
        what it refuses to pack when the trial is packed."""
        validated = self.config_class.model_validate(config, context=CHECK_FILES)
        if self.spec.check is not None:
            self.spec.check(validated)
        if packed and self.spec.check_pack is not None:
            self.spec.check_pack(validated)

    def fixed_arms(self, config: dict[str, Any], plan: ArmPlan) -> Trials:
        if self.spec.fixed_arms is None:
            return []
        return self.spec.fixed_arms(self.config_class.model_validate(config), plan)

    def compare(self, trials: Trials, metrics: list[str]) -> Trials:
        return self.spec.compare(trials, metrics) if self.spec.compare is not None else []

    @property
    def matches_baselines(self) -> bool:
        return self.spec.baselines is not None

    def baselines(self, trial: dict[str, Any], trials: Trials) -> list[tuple[str, dict | None]]:
        return self.spec.baselines(trial, trials) if self.spec.baselines is not None else []

    def uncompared(self, trials: Trials) -> list[str]:
        return self.spec.uncompared(trials) if self.spec.uncompared is not None else []

    def selection_split(self, params: dict[str, Any]) -> str | None:
        return self.spec.selection_split(params) if self.spec.selection_split is not None else None


JOBS: dict[str, Job] = {name: Job(name, module) for name, module in MODULES.items()}
