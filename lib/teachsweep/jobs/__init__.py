"""The jobs a sweep can run, and the protocol through which the sweep layer knows them.

A job is one readable module (lot, lot_rl, teacher, scaffold, explain) that declares:

    Config                    its pydantic config model (extra="forbid")
    train(config, reporter)   the training loop; returns the final metrics; knows nothing of Ray or MLflow
    metrics(config)           {metric name: "max" | "min" | None} it reports for that config (None: no direction)
    OBJECTIVE                 (metric, mode) a sweep optimises when its spec names no objective
    SCORES                    the held-out scores of record that comparisons and tables show
    TEACHER_FIELDS            config fields holding a teacher reference (config, checkpoint dir, mlflow:<run>),
                              resolved and checked by the sweep layer before anything starts
    check(config)             optional: refuse, with a message naming the field, what would fail in a trial
    fixed_arms(config, plan)  optional: extra trials the job wants beside each variant (LoT's teacher-only arms)
    compare(trials, metrics)  optional: the job's own comparisons over finished trials (LoT minus teacher-only)
    baselines(trial, trials)  optional: (budget, the fixed arm standing for `trial`, or None) per budget it ran
    uncompared(trials)        optional: a sentence for each comparison `compare` could not make, saying why
    selection_split(params)   optional: the split a trial's objective is measured on, in words, where the metric's
                              name does not say all of it (what else uses that split)
    REFERENCE_ARM             optional: the variant every other one is compared with, paired by seed (SMaT: none)
    DEFAULT_ARM               optional: the `arm` a config has when it names none (LoT: lot); labels fixed trials
    SAVES_TEACHER             optional: it hands a teacher to `reporter.log_teacher` (a later stage can use it)
    SAVED_TEACHER_SCORES      optional: the held-out scores of that saved teacher (a chained study's teacher columns)
    SINGLE_PROCESS            optional: it runs in one process (no DDP workers): the spec refuses `workers` > 1

A job's own interval of a metric it reports is `<metric>_ci_low/_ci_high`: a bootstrap over the test points of
that metric's split (SMaT's simulability); the sweep layer adds Wilson intervals of accuracies itself.

A new job plugs in by adding its module to MODULES; nothing else in the sweep layer names a job."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from teachsweep.training import CHECK_FILES

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


@dataclass(frozen=True)
class Job:
    name: str
    module_name: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    @property
    def config_class(self) -> Any:
        return self.module.Config

    @property
    def train(self) -> Any:
        return self.module.train

    @property
    def objective(self) -> tuple[str, str]:
        return self.module.OBJECTIVE

    @property
    def scores(self) -> list[str]:
        return list(self.module.SCORES)

    @property
    def teacher_fields(self) -> tuple[str, ...]:
        return tuple(getattr(self.module, "TEACHER_FIELDS", ()))

    @property
    def default_arm(self) -> str | None:
        return getattr(self.module, "DEFAULT_ARM", None)

    @property
    def saves_teacher(self) -> bool:
        return bool(getattr(self.module, "SAVES_TEACHER", False))

    @property
    def saved_teacher_scores(self) -> list[str]:
        return list(getattr(self.module, "SAVED_TEACHER_SCORES", ()))

    @property
    def single_process(self) -> bool:
        return bool(getattr(self.module, "SINGLE_PROCESS", False))

    @property
    def has_fixed_arms(self) -> bool:
        return hasattr(self.module, "fixed_arms")

    @property
    def reference_arm(self) -> str | None:
        return getattr(self.module, "REFERENCE_ARM", None)

    def metrics(self, config: dict[str, Any]) -> dict[str, str | None]:
        return self.module.metrics(self.config_class.model_validate(config))

    def check(self, config: dict[str, Any]) -> None:
        """The config validated as the preflight does (its data files must exist), then the job's own check."""
        validated = self.config_class.model_validate(config, context=CHECK_FILES)
        if hasattr(self.module, "check"):
            self.module.check(validated)

    def fixed_arms(self, config: dict[str, Any], plan: ArmPlan) -> list[dict[str, Any]]:
        return self.module.fixed_arms(self.config_class.model_validate(config), plan) if self.has_fixed_arms else []

    def compare(self, trials: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
        return self.module.compare(trials, metrics) if hasattr(self.module, "compare") else []

    @property
    def matches_baselines(self) -> bool:
        return hasattr(self.module, "baselines")

    def baselines(self, trial: dict[str, Any], trials: list[dict[str, Any]]) -> list[tuple[str, dict | None]]:
        return self.module.baselines(trial, trials) if self.matches_baselines else []

    def uncompared(self, trials: list[dict[str, Any]]) -> list[str]:
        return self.module.uncompared(trials) if hasattr(self.module, "uncompared") else []

    def selection_split(self, params: dict[str, Any]) -> str | None:
        return self.module.selection_split(params) if hasattr(self.module, "selection_split") else None


JOBS: dict[str, Job] = {name: Job(name, module) for name, module in MODULES.items()}
